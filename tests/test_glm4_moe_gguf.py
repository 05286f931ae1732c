"""glm4_moe as a GGUF from llama.cpp's own converter (glm4moe; the llama.cpp inside llama-cpp-python 0.3.36 runs
it): the config read back from its metadata (groups, scaling, shared expert, dense first layer, partial RoPE),
served with experts paged from the file, greedy tokens equal to llama.cpp's up to the first router near-tie, and
the same tokens at 25% of the experts and at the minimum."""
from __future__ import annotations

import pytest
import torch

from glm4_support import config_of, first_sigmoid_router_tie, glm_tokenizer, save_glm4_moe
from gguf_support import LlamaCppGreedy, find_converter, llama_cpp_module
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.sampling import SamplingParams
from qwen35_support import convert_to_gguf
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)

SHAPE = dict(hidden_size=256, head_dim=64, moe_intermediate_size=256, intermediate_size=256)  # K-quant friendly
PROMPT = "import os\nimport sys\n\ndef main():\n"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir):
    llama_cpp_module()
    root = tmp_path_factory.mktemp("glm4-gguf")
    converter = find_converter(str(root / "src"))
    vocab = glm_tokenizer(tokenizer_dir, root / "tok")
    hf = save_glm4_moe(root / "hf", root / "tok", vocab_size=vocab, **SHAPE)
    return hf, convert_to_gguf(converter, hf, root / "model-f16.gguf", "f16")


def test_gguf_metadata_gives_the_config(converted):
    hf, path = converted
    engine = Engine.load(EngineConfig(path, dtype="float32", tokenizer=False))
    a, want = engine.args, config_of(hf)
    assert a.family == "glm4_moe" and a.sparse_layers == [False, True, True] and a.rotary_dim == 32
    r = a.routing
    assert (r.scoring, r.n_group, r.topk_group, r.top_k, r.routed_scaling_factor, r.norm_topk_prob) == (
        "sigmoid_group_topk", want["n_group"], want["topk_group"], want["num_experts_per_tok"],
        want["routed_scaling_factor"], True)
    assert a.shared_expert_intermediate_size == want["moe_intermediate_size"] and a.qkv_bias and a.qk_norm == "head"
    gate = engine.model.layers[1].moe.gate
    assert gate.correction_bias.dtype == torch.float32 and gate.correction_bias.abs().min() > 0
    engine.close()


def test_f16_greedy_equals_llama_cpp_at_every_budget(converted):
    hf, path = converted
    engine = Engine.load(EngineConfig(path, dtype="float32"))
    ids = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ours = [s.token for s in engine.generate(ids, params)]
    llm = LlamaCppGreedy(path)
    try:
        theirs, rows = llm.generate(ids, 32)
    finally:
        llm.close()
    n = min(32, first_sigmoid_router_tie(hf, ids + theirs, config_of(hf)) - len(ids) + 1)
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
