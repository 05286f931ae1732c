"""Qwen3.5/3.6 MoE served from its published multimodal layout (and the text-only layout) against transformers:
fp32 logits within 1e-4, bf16 greedy tokens equal to transformers.generate, the same tokens at every expert budget
from split and split --lossless directories, exact prompt re-use through the recurrent layers, one HTTP request.

Shape legend: V vocab, H hidden.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch

from conftest import prompt_ids
from family_support import (check_budgets_from_split_dirs, check_serves_over_http, edited_config_dir, greedy,
                            greedy_of, logits_gap, reference_greedy)
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.model_args import ConfigError
from qwen35_support import save_qwen35, save_qwen35_text, with_published_extras
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)


def reference(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def published(tmp_path_factory, tokenizer_dir):
    """{dtype name: the published multimodal layout (mtp shard and config extras included)}, built lazily."""
    def build(dtype: str):
        d = save_qwen35(tmp_path_factory.mktemp(f"qwen35-{dtype}"), tokenizer_dir, dtype=getattr(torch, dtype))
        with_published_extras(d)
        return d

    return functools.cache(build)


@pytest.mark.parametrize("layout", ["published", "text"])
def test_fp32_logits_match_transformers(layout, published, tmp_path):
    path = published("float32") if layout == "published" else save_qwen35_text(tmp_path, seed=1)
    engine = Engine.load(EngineConfig(str(path), tokenizer=False))
    diff = logits_gap(engine, path, prompt_ids(64, engine.args.vocab_size), reference)
    assert diff < 1e-4, f"{layout}: max abs logit diff {diff}"
    assert engine.args.mixers.count("linear_attention") == 3
    engine.close()


def test_visual_tower_and_mtp_are_never_read(published):
    ckpt = open_checkpoint(str(published("float32")))
    names = set(ckpt.resident_checkpoint_names().values())
    assert names and all(n.startswith("model.language_model.") or n == "lm_head.weight" for n in names)
    assert not any("visual" in n or n.startswith("mtp.") for n in names)
    assert ckpt.expert_names["gate"] == "model.language_model.layers.{L}.mlp.experts.{E}.gate_proj.weight"


def test_bf16_greedy_matches_transformers_generate(published):
    path = published("bfloat16")
    ids = prompt_ids(24, 400, seed=2)
    assert greedy_of(path, ids) == reference_greedy(path, ids, reference=reference)


def test_budgets_give_identical_tokens_from_split_dirs(published, tmp_path):
    src = published("bfloat16")
    ids = prompt_ids(40, 400, seed=3)
    want = greedy_of(src, ids, tokenizer=False)
    check_budgets_from_split_dirs(src, ids, want, tmp_path)


def test_memory_plan_counts_the_recurrent_state(published):
    engine = Engine.load(EngineConfig(str(published("bfloat16")), ctx_size=256, tokenizer=False))
    a, la = engine.args, engine.args.linear_attention
    conv = (la["conv_kernel"] - 1) * (2 * la["num_k_heads"] * la["k_head_dim"] + la["num_v_heads"] * la["v_head_dim"])
    recurrent = la["num_v_heads"] * la["k_head_dim"] * la["v_head_dim"] * 4  # float32
    kv = 2 * a.num_kv_heads * a.head_dim * 256 * 2  # one full-attention layer, bf16
    assert engine.kv.nbytes == 3 * (conv * 2 + recurrent) + kv  # the live state
    # the plan also holds the recurrent states' copy at the newest chunk end (prompt_cache.LayerStates.mark)
    assert engine.plan.kv_bytes == engine.kv.nbytes + 3 * (conv * 2 + recurrent)
    engine.close()


def test_prompt_reuse_through_recurrent_layers_is_exact(published):
    """A second prompt sharing a prefix re-uses the state marked at a whole prefill chunk and gives the fresh
    prefill's tokens."""
    path = str(published("bfloat16"))
    first, second = prompt_ids(40, 400, seed=4), None
    second = first[:36] + prompt_ids(10, 400, seed=5)
    fresh = Engine.load(EngineConfig(path, prefill_chunk=16, tokenizer=False))
    want = greedy(fresh, second, 12)
    fresh.close()
    cached = Engine.load(EngineConfig(path, prefill_chunk=16, prefix_cache=True, tokenizer=False))
    greedy(cached, first, 12)
    got = greedy(cached, second, 12)
    assert cached.last_stats.cached_prompt_tokens == 32  # two whole chunks of the shared 36 tokens
    assert got == want
    cached.close()


def test_layer_types_of_the_wrong_length_are_refused(published, tmp_path):
    d = edited_config_dir(published("float32"), tmp_path / "bad",
                          lambda config: config["text_config"].update(layer_types=["linear_attention"] * 3))
    with pytest.raises(ConfigError, match="layer_types"):
        open_checkpoint(str(d))


def test_serve_answers_over_http(published):
    check_serves_over_http(published("bfloat16"))


def test_snapshot_at_the_current_length_continues_exactly(published):
    """SequenceState.snapshot at the current length (not a marked chunk boundary) copies the live recurrent
    states: a fresh state restored from it continues to the same logits bit for bit."""
    engine = Engine.load(EngineConfig(str(published("float32")), tokenizer=False))
    m, ids = engine.model, prompt_ids(21, 400, seed=7)
    a = m.new_state(64)
    m.forward(torch.tensor(ids[:13]), a)
    snap = a.snapshot(13)
    want = m.forward(torch.tensor(ids[13:]), a, all_logits=True)
    b = m.new_state(64)
    assert b.restore(snap, 13) == 13
    assert torch.equal(m.forward(torch.tensor(ids[13:]), b, all_logits=True), want)
    engine.close()


def test_moepage_gguf_export_refuses_linear_attention(published, tmp_path):
    from moepage.surgery.gguf_export import GGUFExportError, write_gguf

    with pytest.raises(GGUFExportError, match="linear-attention"):
        write_gguf(str(published("float32")), str(tmp_path / "out.gguf"))
    assert not (tmp_path / "out.gguf").exists()


def test_extract_from_the_published_layout(published, tmp_path):
    """`extract` on the multimodal layout: the expert count changes inside text_config, the result keeps only text
    weights (model.language_model.*, lm_head) and transformers and moepage agree on it; every expert kept gives the
    source's logits bit for bit."""
    from safetensors import safe_open

    from moepage.surgery.extract import write_extracted_moe

    src = open_checkpoint(str(published("float32")))
    ids = prompt_ids(20, 400, seed=8)
    for kept in ([0, 2, 5, 7], list(range(8))):
        out = tmp_path / f"extract-{len(kept)}"
        out.mkdir()
        write_extracted_moe(src, {layer: kept for layer in src.args.moe_layers}, str(out))
        config = json.loads((out / "config.json").read_text())
        assert config["text_config"]["num_experts"] == len(kept) and "num_experts" not in config
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert all(n.startswith("model.language_model.") or n == "lm_head.weight" for n in f.keys())
        engine = Engine.load(EngineConfig(str(out), tokenizer=False))
        ours = engine.logits_all(ids)
        engine.close()
        with torch.no_grad():
            ref = reference(out)(torch.tensor([ids])).logits[0]
        assert (ours - ref).abs().max().item() < 1e-4
    full = Engine.load(EngineConfig(str(published("float32")), tokenizer=False))
    assert torch.equal(full.logits_all(ids), ours)
    full.close()
