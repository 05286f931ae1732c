"""Upcycling: drop 0 reproduces the dense logits (transformers and moepage), drop > 0 diverges, bad input errors."""
from __future__ import annotations

import json

import pytest
import torch

from moepage.engine.engine import Engine, EngineConfig
from moepage.surgery.upcycle import UpcycleConfig, upcycle
from conftest import prompt_ids, reference_model


def make_dense(out_dir, model_type: str, tokenizer_dir, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    info = json.loads((tokenizer_dir / "info.json").read_text())
    common = dict(vocab_size=info["vocab_size"], hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=info["eos_token_id"], bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    cfg = Qwen2Config(**common) if model_type == "qwen2" else Qwen3Config(**common, head_dim=16)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() >= 2 else p.normal_(1.0 if p.dim() == 1 else 0.0, 0.05)
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out_dir


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory, tokenizer_dir):
    return {t: make_dense(tmp_path_factory.mktemp(f"dense-{t}"), t, tokenizer_dir) for t in ("qwen2", "qwen3")}


@pytest.mark.parametrize("model_type,shared,top_k", [("qwen2", 1, 2), ("qwen2", 1, 1), ("qwen3", 0, 2)])
def test_upcycle_drop0_reproduces_dense_logits(dense_dirs, tmp_path, model_type, shared, top_k):
    dense_dir = dense_dirs[model_type]
    out = tmp_path / "moe"
    summary = upcycle(str(dense_dir), str(out), UpcycleConfig(experts=4, shared=shared, top_k=top_k, drop=0.0))
    assert summary["model_type"] == f"{model_type}_moe"
    ids = prompt_ids(24, 390)
    with torch.no_grad():
        dense_logits = reference_model(dense_dir)(torch.tensor([ids])).logits[0]
        hf_moe_logits = reference_model(out)(torch.tensor([ids])).logits[0]
    engine = Engine.load(EngineConfig(model=str(out), dtype="float32"))
    try:
        ours = engine.logits_all(ids)
    finally:
        engine.close()
    assert (hf_moe_logits - dense_logits).abs().max().item() < 1e-4
    assert (ours - dense_logits).abs().max().item() < 1e-4


def test_upcycle_drop_makes_experts_diverge(dense_dirs, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "moe"
    upcycle(str(dense_dirs["qwen2"]), str(out), UpcycleConfig(experts=3, shared=1, top_k=1, drop=0.3, seed=1))
    w = load_file(str(out / "model.safetensors"))
    g0 = w["model.layers.0.mlp.experts.0.gate_proj.weight"]
    g1 = w["model.layers.0.mlp.experts.1.gate_proj.weight"]
    changed_rows = (g0 != g1).any(dim=1).float().mean().item()
    assert 0.3 <= changed_rows <= 0.7  # each copy re-draws 30% of its 96 neurons, independently
    assert not torch.equal(g0, g1)


@pytest.mark.parametrize("model_type,kwargs,message", [
    ("qwen3", dict(shared=1), "no shared expert"),
    ("qwen2", dict(shared=0), "always has a shared expert"),
    ("qwen2", dict(top_k=9), "--top-k"),
    ("qwen2", dict(drop=1.5), "--drop"),
])
def test_upcycle_rejects_bad_options(dense_dirs, tmp_path, model_type, kwargs, message):
    with pytest.raises(ValueError, match=message):
        upcycle(str(dense_dirs[model_type]), str(tmp_path / "x"), UpcycleConfig(**kwargs))


def test_upcycle_rejects_moe_input(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="not trainable here|reads dense"):
        upcycle(str(checkpoints("mixtral")), str(tmp_path / "x"), UpcycleConfig())
