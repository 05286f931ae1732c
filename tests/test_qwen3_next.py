"""Qwen3-Next (text-only, fused in_proj_qkvz / in_proj_ba, a dense mlp_only layer) against transformers: fp32
logits within 1e-4, bf16 greedy tokens equal to transformers.generate, the same tokens at every expert budget from
split and split --lossless directories, one HTTP request, a hostile config refused."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from conftest import prompt_ids
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.model_args import ConfigError
from qwen35_support import check_budgets_from_split_dirs, greedy, save_qwen3_next
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    made = {}

    def get(dtype: str):
        if dtype not in made:
            made[dtype] = save_qwen3_next(tmp_path_factory.mktemp(f"next-{dtype}"), tokenizer_dir,
                                          dtype=getattr(torch, dtype))
        return made[dtype]

    return get


def reference(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_fp32_logits_match_transformers(checkpoint):
    path = checkpoint("float32")
    engine = Engine.load(EngineConfig(str(path), tokenizer=False))
    assert engine.args.sparse_layers == [True, False, True, True]  # mlp_only_layers [1]
    ids = prompt_ids(64, engine.args.vocab_size)
    ours = engine.logits_all(ids)
    with torch.no_grad():
        ref = reference(path)(torch.tensor([ids])).logits[0]
    assert (ours.float() - ref.float()).abs().max().item() < 1e-4
    engine.close()


def test_bf16_greedy_and_budgets_from_split_dirs(checkpoint, tmp_path):
    src = checkpoint("bfloat16")
    ids = prompt_ids(24, 400, seed=2)
    full = Engine.load(EngineConfig(str(src), tokenizer=False))
    want = greedy(full, ids)
    full.close()
    out = reference(src, torch.bfloat16).generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                                  do_sample=False, eos_token_id=None, pad_token_id=0)
    assert want == out[0, len(ids):].tolist()
    check_budgets_from_split_dirs(src, ids, want, tmp_path)


def test_serve_answers_over_http(checkpoint):
    from server_support import load_engine, serving

    engine = load_engine(str(checkpoint("bfloat16")))
    ids = prompt_ids(12, 400, seed=6)
    want = greedy(engine, ids, 8)
    with serving(engine) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": "hardening-test", "prompt": ids, "max_tokens": 8,
                                                         "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(want)
    engine.close()


@pytest.mark.parametrize("key, value", [("linear_num_value_heads", 3), ("linear_key_head_dim", 1 << 30),
                                        ("layer_types", ["full_attention"])])
def test_hostile_config_is_refused_naming_the_key(checkpoint, tmp_path, key, value):
    src = checkpoint("float32")
    config = json.loads((src / "config.json").read_text())
    config[key] = value
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    for f in src.glob("*.safetensors*"):
        (d / f.name).symlink_to(f)
    with pytest.raises(ConfigError, match=key):
        open_checkpoint(str(d))
