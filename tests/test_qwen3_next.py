"""Qwen3-Next (text-only, fused in_proj_qkvz / in_proj_ba, a dense mlp_only layer) against transformers: fp32
logits within 1e-4, bf16 greedy tokens equal to transformers.generate, the same tokens at every expert budget from
split and split --lossless directories, one HTTP request, a hostile config refused."""
from __future__ import annotations

import functools

import pytest
import torch

from conftest import prompt_ids
from family_support import (check_budgets_from_split_dirs, check_serves_over_http, edited_config_dir, greedy_of,
                            logits_gap, reference_greedy)
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.model_args import ConfigError
from qwen35_support import save_qwen3_next
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return functools.cache(lambda dtype: save_qwen3_next(tmp_path_factory.mktemp(f"next-{dtype}"), tokenizer_dir,
                                                         dtype=getattr(torch, dtype)))


def reference(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_fp32_logits_match_transformers(checkpoint):
    path = checkpoint("float32")
    engine = Engine.load(EngineConfig(str(path), tokenizer=False))
    assert engine.args.sparse_layers == [True, False, True, True]  # mlp_only_layers [1]
    assert logits_gap(engine, path, prompt_ids(64, engine.args.vocab_size), reference) < 1e-4
    engine.close()


def test_bf16_greedy_and_budgets_from_split_dirs(checkpoint, tmp_path):
    src = checkpoint("bfloat16")
    ids = prompt_ids(24, 400, seed=2)
    want = greedy_of(src, ids, tokenizer=False)
    assert want == reference_greedy(src, ids, reference=reference)
    check_budgets_from_split_dirs(src, ids, want, tmp_path)


def test_serve_answers_over_http(checkpoint):
    check_serves_over_http(checkpoint("bfloat16"))


@pytest.mark.parametrize("key, value", [("linear_num_value_heads", 3), ("linear_key_head_dim", 1 << 30),
                                        ("layer_types", ["full_attention"])])
def test_hostile_config_is_refused_naming_the_key(checkpoint, tmp_path, key, value):
    d = edited_config_dir(checkpoint("float32"), tmp_path / "bad", lambda config: config.update({key: value}))
    with pytest.raises(ConfigError, match=key):
        open_checkpoint(str(d))
