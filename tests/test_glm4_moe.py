"""GLM-4.5-style glm4_moe (q/k norm, partial RoPE, qkv bias, sigmoid group-limited router with a non-zero float32
correction bias, a shared expert, a dense first layer) against transformers: fp32 logits within 1e-4, bf16 greedy
tokens equal to transformers.generate, the same tokens at every expert budget from split and split --lossless
directories, one HTTP request, hostile configs refused naming the key."""
from __future__ import annotations

import functools

import pytest
import torch

from conftest import prompt_ids
from family_support import (check_budgets_from_split_dirs, check_serves_over_http, edited_config_dir, greedy,
                            logits_gap, reference_greedy)
from glm4_support import save_glm4_moe, stored_dtypes
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.model_args import ConfigError
from moepage.engine.router import Router
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return functools.cache(lambda dtype: save_glm4_moe(tmp_path_factory.mktemp(f"glm-{dtype}"), tokenizer_dir,
                                                       dtype=getattr(torch, dtype)))


def test_fp32_logits_match_transformers(checkpoint):
    path = checkpoint("float32")
    engine = Engine.load(EngineConfig(str(path), tokenizer=False))
    a = engine.args
    assert a.sparse_layers == [False, True, True] and a.rotary_dim == 8 and a.shared_expert_intermediate_size == 32
    assert (a.routing.n_group, a.routing.topk_group, a.routing.routed_scaling_factor) == (4, 2, 2.5)
    bias = engine.model.layers[1].moe.gate.correction_bias
    assert bias is not None and bias.abs().min() > 0
    assert logits_gap(engine, path, prompt_ids(64, a.vocab_size)) < 1e-4
    engine.close()


def test_correction_bias_changes_the_choice(checkpoint):
    """The bias steers routing in this fixture (else a loader that dropped it would pass the logits test)."""
    engine = Engine.load(EngineConfig(str(checkpoint("float32")), tokenizer=False))
    gate = engine.model.layers[1].moe.gate
    x = torch.randn(64, engine.args.hidden_size, generator=torch.Generator().manual_seed(3))
    _, with_bias = gate(x)
    _, without = Router(gate.weight, gate.config)(x)
    assert (with_bias.sort(-1).values != without.sort(-1).values).any()
    engine.close()


def test_bf16_greedy_and_budgets_from_split_dirs(checkpoint, tmp_path):
    src = checkpoint("bfloat16")
    dtypes = stored_dtypes(src)
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    ids = prompt_ids(24, 400, seed=2)
    full = Engine.load(EngineConfig(str(src), tokenizer=False))
    assert full.model.layers[1].moe.gate.correction_bias.dtype == torch.float32
    want = greedy(full, ids)
    full.close()
    assert want == reference_greedy(src, ids)
    check_budgets_from_split_dirs(src, ids, want, tmp_path)


def test_serve_answers_over_http(checkpoint):
    check_serves_over_http(checkpoint("bfloat16"))


@pytest.mark.parametrize("key, value", [("n_group", 3), ("topk_group", 5), ("first_k_dense_replace", 9),
                                        ("n_shared_experts", -1), ("routed_scaling_factor", "big"),
                                        ("mlp_layer_types", ["dense"])])
def test_hostile_config_is_refused_naming_the_key(checkpoint, tmp_path, key, value):
    d = edited_config_dir(checkpoint("float32"), tmp_path / "bad", lambda config: config.update({key: value}))
    with pytest.raises(ConfigError, match=key):
        open_checkpoint(str(d))
