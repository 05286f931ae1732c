"""Multi-head latent attention beyond the families' logits: the cache holds the latent and the rope key only (C + Dr
values a token and layer, what the budget counts), a snapshot of it restores to the same continuation, Kimi K2.5's
published wrapper layout loads its text model (fp32 logits against transformers' Kimi_K25ForConditionalGeneration,
the same greedy tokens from a split directory at the minimum budget), DeepSeek-V3 answers over HTTP, hostile MLA
configs are refused with the key named, the GGUF exporter refuses MLA (llama.cpp's converter writes it)."""
from __future__ import annotations

import pytest
import torch

from conftest import prompt_ids
from family_support import check_budgets_from_split_dirs, check_serves_over_http, edited_config_dir, greedy
from mla_support import save_kimi_k25, save_mla
from moepage.engine.attention.mla import MLAShape
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.model_args import ConfigError
from moepage.engine.sequence_state import state_nbytes
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)


@pytest.fixture(scope="module")
def v3(tmp_path_factory, tokenizer_dir):
    return save_mla("deepseek_v3", tmp_path_factory.mktemp("v3"), tokenizer_dir, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory, tokenizer_dir):
    return save_kimi_k25(tmp_path_factory.mktemp("kimi"), tokenizer_dir)


def test_latent_cache_bytes_are_what_the_budget_counts(v3):
    engine = Engine.load(EngineConfig(str(v3), tokenizer=False, ctx_size=100))
    a = engine.args
    shape = MLAShape(**a.mla)
    assert shape.latent_dim == 32 + 8
    state = engine.model.new_state(100)
    assert state.kv.v is None and tuple(state.kv.k.shape) == (3, 1, 1, 100, 40)  # [L, 1, 1, S, C + Dr], no values
    assert state.kv.nbytes == state_nbytes(a, 100, torch.bfloat16) == 3 * 100 * 40 * 2
    assert engine.plan.kv_bytes == 3 * 100 * 40 * 2
    engine.close()


def test_snapshot_restores_the_same_continuation(v3):
    engine = Engine.load(EngineConfig(str(v3), tokenizer=False))
    model, ids = engine.model, prompt_ids(20, 400, seed=3)
    state = model.new_state(64)
    model.forward(torch.tensor(ids[:12]), state)
    snap = state.snapshot(12)
    first = model.forward(torch.tensor(ids[12:]), state)
    state.restore(snap, 12)
    again = model.forward(torch.tensor(ids[12:]), state)
    assert torch.equal(first, again)
    engine.close()


def test_kimi_k25_wrapper_text_model_matches_transformers(kimi, tmp_path):
    from transformers import Kimi_K25ForConditionalGeneration

    engine = Engine.load(EngineConfig(str(kimi), tokenizer=False))
    assert engine.args.family == "kimi_k25" and engine.ckpt.names["lm_head"] == "language_model.lm_head.weight"
    ids = prompt_ids(48, 400)
    ours = engine.logits_all(ids)
    ref = Kimi_K25ForConditionalGeneration.from_pretrained(kimi, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
    assert (ours - want).abs().max().item() < 1e-4
    tokens = greedy(engine, ids[:16], 16)
    engine.close()
    check_budgets_from_split_dirs(kimi, ids[:16], tokens, tmp_path, torch.float32, lossless=(False,),
                                  labels=("minimum",))


def test_serve_answers_over_http(v3):
    check_serves_over_http(v3)


@pytest.mark.parametrize("key, value", [("kv_lora_rank", 1 << 30), ("qk_rope_head_dim", 7), ("q_lora_rank", -1),
                                        ("scoring_func", "softmax"), ("n_group", 3),
                                        ("partial_rotary_factor", 0.5), ("v_head_dim", None)])
def test_hostile_config_is_refused_naming_the_key(v3, tmp_path, key, value):
    d = edited_config_dir(v3, tmp_path / "bad", lambda c: c.pop(key) if value is None else c.update({key: value}))
    with pytest.raises(ConfigError, match=key):
        open_checkpoint(str(d))


def test_gguf_export_refuses_latent_attention(v3, tmp_path):
    from moepage.surgery.gguf_export import GGUFExportError, write_gguf

    with pytest.raises(GGUFExportError, match="multi-head latent attention"):
        write_gguf(str(v3), str(tmp_path / "out.gguf"))
    assert not (tmp_path / "out.gguf").exists()
