"""Qwen3.5-MoE as a GGUF from llama.cpp's own converter (qwen35moe; the llama.cpp inside llama-cpp-python 0.3.36
runs it): served with experts paged from the file, greedy tokens equal to llama.cpp's up to the first router
near-tie, at 25% of the experts and at the minimum."""
from __future__ import annotations

import json

import pytest

from gguf_support import check_gguf_against_llama_cpp, hf_and_gguf
from moepage.engine.engine import Engine, EngineConfig
from qwen35_support import convert_to_gguf, save_qwen35
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)

# K-quant friendly sizes (rows a multiple of 256), the published multimodal layout with its tiny vision tower
SHAPE = dict(hidden_size=256, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
             moe_intermediate_size=256, shared_expert_intermediate_size=256)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir):
    vocab = json.loads((tokenizer_dir / "info.json").read_text())["vocab_size"]
    return hf_and_gguf(tmp_path_factory, "qwen35-gguf",
                       lambda root: save_qwen35(root / "hf", tokenizer_dir, vocab_size=vocab, **SHAPE), convert_to_gguf)


def test_gguf_reads_the_hybrid_layers(converted):
    hf, path = converted
    engine = Engine.load(EngineConfig(path, dtype="float32", tokenizer=False))
    a = engine.args
    assert a.family == "qwen3_5_moe" and a.mixers == ["linear_attention"] * 3 + ["full_attention"]
    assert a.linear_attention["tiled_value_heads"] and a.rotary_dim == 16 and a.norm_unit_offset
    engine.close()


def test_f16_greedy_equals_llama_cpp_at_every_budget(converted):
    check_gguf_against_llama_cpp(*converted)
