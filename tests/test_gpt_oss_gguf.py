"""gpt-oss as llama.cpp's converter writes it (arch gpt-oss, MXFP4 experts kept MXFP4 in the file and in the cache,
expert biases, attention sinks): served with the experts paged and multiplied by ggml's MXFP4 kernels, its greedy
tokens equal llama.cpp's own up to the first router near-tie."""
from __future__ import annotations

import pytest
import torch

from gguf_support import check_greedy_against_llama_cpp, convert_one, find_converter, first_router_tie
from gpt_oss_support import reference, save_gpt_oss
from gpt_oss_support import one_torch_thread  # noqa: F401 (autouse: one thread here)
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.gpt_oss_expert import GptOssGGUFExpert


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_gguf")
    hf = save_gpt_oss(root / "hf", dtype=torch.bfloat16, mxfp4_experts=True, seed=5, router_scale=10.0)
    return hf, convert_one(find_converter(str(root)), hf, root / "gpt-oss-mxfp4.gguf", "bf16")


def test_mxfp4_experts_stay_mxfp4(gguf):
    engine = Engine.load(EngineConfig(gguf[1], threads=1))
    assert engine.ckpt.kind == "gguf" and engine.args.family == "gpt_oss"
    assert engine.args.mixers == ["sliding_attention", "full_attention"] * 2
    ex = engine.cache.load(0, 1)
    assert isinstance(ex, GptOssGGUFExpert) and {t.type.name for t in (ex.w.weights.gate, ex.w.weights.up,
                                                                     ex.w.weights.down)} == {"MXFP4"}
    H = I = 64
    assert engine.plan.expert_bytes_each == ex.nbytes == 3 * H * I * 17 // 32 + (2 * I + H) * 4
    engine.close()


def test_greedy_equals_llama_cpp(gguf):
    hf, path = gguf
    engine = Engine.load(EngineConfig(path, dtype="float32", threads=1))
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    top_k = engine.args.top_k
    check_greedy_against_llama_cpp(engine, path, ids, lambda seq: first_router_tie(hf, seq, top_k, reference(hf)),
                                   n=24, max_gap=0.1)
    engine.close()
