"""Qwen3.5-MoE as a GGUF from llama.cpp's own converter (qwen35moe; the llama.cpp inside llama-cpp-python 0.3.36
runs it): served with experts paged from the file, fp32 logits equal to transformers' on the source checkpoint,
greedy tokens equal to llama.cpp's up to the first near-tie, at every expert budget."""
from __future__ import annotations

import json

import pytest
import torch

from gguf_support import LlamaCppGreedy, find_converter, llama_cpp_module
from test_gguf_families import first_router_tie
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.sampling import SamplingParams
from qwen35_support import convert_to_gguf, save_qwen35
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)

# K-quant friendly sizes (rows a multiple of 256), the published multimodal layout with its tiny vision tower
SHAPE = dict(hidden_size=256, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
             moe_intermediate_size=256, shared_expert_intermediate_size=256)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir):
    llama_cpp_module()
    root = tmp_path_factory.mktemp("qwen35-gguf")
    converter = find_converter(str(root / "src"))
    vocab = json.loads((tokenizer_dir / "info.json").read_text())["vocab_size"]
    hf = save_qwen35(root / "hf", tokenizer_dir, vocab_size=vocab, **SHAPE)
    return hf, convert_to_gguf(converter, hf, root / "model-f16.gguf", "f16")


def test_gguf_reads_the_hybrid_layers(converted):
    hf, path = converted
    engine = Engine.load(EngineConfig(path, dtype="float32", tokenizer=False))
    a = engine.args
    assert a.family == "qwen3_5_moe" and a.mixers == ["linear_attention"] * 3 + ["full_attention"]
    assert a.linear_attention["tiled_value_heads"] and a.rotary_dim == 16 and a.norm_unit_offset
    engine.close()


def test_f16_greedy_equals_llama_cpp_at_every_budget(converted):
    hf, path = converted
    engine = Engine.load(EngineConfig(path, dtype="float32"))
    ids = engine.tokenizer.encode("import os\nimport sys\n\ndef main():\n")
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ours = [s.token for s in engine.generate(ids, params)]
    llm = LlamaCppGreedy(path)
    try:
        theirs, rows = llm.generate(ids, 32)
    finally:
        llm.close()
    # compared up to the first router near-tie (tests/test_gguf_families.py), where an f16 rounding may pick
    # another expert and the two continuations part for a reason that is not a bug
    n = min(32, first_router_tie(str(hf), ids + theirs, engine.args.top_k) - len(ids) + 1)
    assert n >= 8, f"a router near-tie after {n} tokens; pick a prompt without one"
    logits = engine.logits_all(ids + theirs)[len(ids) - 1 : len(ids) - 1 + n]
    gap = (logits - torch.stack([torch.from_numpy(r) for r in rows[:n]])).abs().max().item()
    assert gap < 0.05, f"logits differ from llama.cpp's by {gap} within {n} tokens"
    i = next((k for k, (x, y) in enumerate(zip(ours[:n], theirs[:n])) if x != y), None)
    if i is not None:  # only where llama.cpp's own top two are within the logit gap
        assert float(rows[i][theirs[i]] - rows[i][ours[i]]) < 3 * gap, (i, ours, theirs)
    a, each = engine.args, engine.plan.expert_bytes_each
    engine.close()
    for budget in (each * len(a.moe_layers) * a.num_experts // 4, a.top_k * each):  # 25% and the minimum
        paged = Engine.load(EngineConfig(path, dtype="float32", expert_cache_bytes=budget, preload=False))
        assert [s.token for s in paged.generate(ids, params)] == ours
        assert paged.cache.stats.snapshot()["evictions"] > 0
        paged.close()
