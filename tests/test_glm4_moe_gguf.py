"""glm4_moe as a GGUF from llama.cpp's own converter (glm4moe; the llama.cpp inside llama-cpp-python 0.3.36 runs
it): the config read back from its metadata (groups, scaling, shared expert, dense first layer, partial RoPE),
served with experts paged from the file, greedy tokens equal to llama.cpp's up to the first router near-tie, and
the same tokens at 25% of the experts and at the minimum."""
from __future__ import annotations

import pytest
import torch

from family_support import config_of
from glm4_support import first_sigmoid_router_tie, glm_tokenizer, save_glm4_moe
from gguf_support import check_paged_gguf, hf_and_gguf
from moepage.engine.engine import Engine, EngineConfig
from qwen35_support import convert_to_gguf
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)

SHAPE = dict(hidden_size=256, head_dim=64, moe_intermediate_size=256, intermediate_size=256)  # K-quant friendly
PROMPT = "import os\nimport sys\n\ndef main():\n"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir):
    def make_hf(root):
        return save_glm4_moe(root / "hf", root / "tok", vocab_size=glm_tokenizer(tokenizer_dir, root / "tok"), **SHAPE)

    return hf_and_gguf(tmp_path_factory, "glm4-gguf", make_hf, convert_to_gguf)


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
    check_paged_gguf(engine, path, ids, lambda seq: first_sigmoid_router_tie(hf, seq, config_of(hf)))
