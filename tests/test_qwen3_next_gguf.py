"""Qwen3-Next as a GGUF from llama.cpp's own converter (arch qwen3next: in_proj_qkvz split into attn_qkv and
attn_gate, in_proj_ba kept whole as ssm_ba, value heads in their published order; the llama.cpp inside
llama-cpp-python 0.3.36 runs it): served with experts paged from the file, greedy tokens equal to llama.cpp's up to
the first router near-tie, at 25% of the experts and at the minimum; a `split` of the file gives the same tokens."""
from __future__ import annotations

import json

import pytest

from family_support import check_budgets, greedy
from gguf_support import check_gguf_against_llama_cpp, hf_and_gguf
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.families.qwen3_next import GGUF_NAMES
from qwen35_support import convert_to_gguf, save_qwen3_next
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)

# K-quant friendly sizes (rows a multiple of 256); every layer sparse, as published (llama.cpp's converter has no
# name for a qwen3next dense mlp_only layer)
SHAPE = dict(hidden_size=256, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
             moe_intermediate_size=256, shared_expert_intermediate_size=256, intermediate_size=512, mlp_only_layers=[])


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir):
    vocab = json.loads((tokenizer_dir / "info.json").read_text())["vocab_size"]
    return hf_and_gguf(tmp_path_factory, "qwen3-next-gguf",
                       lambda root: save_qwen3_next(root / "hf", tokenizer_dir, vocab_size=vocab, **SHAPE),
                       convert_to_gguf)


def test_gguf_reads_the_split_projections(converted):
    hf, path = converted
    engine = Engine.load(EngineConfig(path, dtype="float32", tokenizer=False))
    a = engine.args
    assert a.family == "qwen3_next" and a.mixers == ["linear_attention"] * 3 + ["full_attention"]
    assert a.linear_attention["layout"] == "qwen3_next_gguf" and not a.linear_attention["tiled_value_heads"]
    assert a.sparse_layers == [True] * 4 and a.rotary_dim == 16 and a.norm_unit_offset
    names = set(engine.ckpt.resident_checkpoint_names().values())
    assert {"blk.0.attn_qkv.weight", "blk.0.attn_gate.weight", "blk.0.ssm_ba.weight"} <= names
    assert not any("ssm_beta" in n or "ssm_alpha" in n for n in names)
    assert GGUF_NAMES["layers.{L}.linear_attn.in_proj_ba"] == "blk.{L}.ssm_ba.weight"
    engine.close()


def test_f16_greedy_equals_llama_cpp_at_every_budget(converted):
    check_gguf_against_llama_cpp(*converted)


def test_split_of_the_gguf_gives_the_files_tokens_at_the_minimum(converted, tmp_path):
    from moepage.surgery.split_gguf import split_gguf

    _, path = converted
    split_gguf(path, str(tmp_path / "split"))
    whole = Engine.load(EngineConfig(path, dtype="float32"))
    ids = whole.tokenizer.encode("import os\n")
    want = greedy(whole, ids, 16)
    a, each = whole.args, whole.plan.expert_bytes_each
    whole.close()
    check_budgets([tmp_path / "split"], ids, want, each, a, ("minimum",), dtype="float32")
