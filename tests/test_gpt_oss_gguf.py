"""gpt-oss as llama.cpp's converter writes it (arch gpt-oss, MXFP4 experts kept MXFP4 in the file and in the cache,
expert biases, attention sinks): served with the experts paged and multiplied by ggml's MXFP4 kernels, its greedy
tokens equal llama.cpp's own up to the first router near-tie."""
from __future__ import annotations

import pytest
import torch

from gguf_support import LlamaCppGreedy, convert, find_converter
from gpt_oss_support import reference, save_gpt_oss
from gpt_oss_support import one_torch_thread  # noqa: F401 (autouse: one thread here)
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.gpt_oss_expert import GptOssGGUFExpert
from moepage.engine.sampling import SamplingParams

ROUTER_TIE = 0.01  # as tests/test_gguf_families.py: llama.cpp's rounded activations may pick another expert there


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_gguf")
    hf = save_gpt_oss(root / "hf", dtype=torch.bfloat16, mxfp4_experts=True, seed=5, router_scale=10.0)
    out = root / "gpt-oss-mxfp4.gguf"
    convert(find_converter(str(root)), [(hf, out, "bf16")])
    return hf, str(out)


def first_router_tie(hf_dir, ids: list[int], top_k: int) -> int:
    model = reference(hf_dir)
    with torch.no_grad():
        router = model(torch.tensor([ids]), output_router_logits=True).router_logits
    top = torch.stack([r.reshape(len(ids), -1).topk(top_k + 1, dim=-1).values for r in router])  # [L, T, k+1]
    tied = ((top[..., top_k - 1] - top[..., top_k]) < ROUTER_TIE).any(0).nonzero()
    return int(tied[0]) if len(tied) else len(ids)


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
    ours = [s.token for s in engine.generate(ids, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))]
    llm = LlamaCppGreedy(path)
    try:
        theirs, rows = llm.generate(ids, 24)
    finally:
        llm.close()
    n = min(24, first_router_tie(hf, ids + theirs, engine.args.top_k) - len(ids) + 1)
    assert n >= 8, f"a router near-tie after {n} tokens; pick a prompt without one"
    logits = engine.logits_all(ids + theirs)[len(ids) - 1 : len(ids) - 1 + n]
    gap = (logits - torch.stack([torch.from_numpy(r) for r in rows[:n]])).abs().max().item()
    print(f"\ngpt-oss GGUF: compared {n} tokens, logit gap {gap:.4f}, equal {ours[:n] == theirs[:n]}")
    assert gap < 0.1, f"logits differ from llama.cpp's by {gap} within {n} tokens"
    i = next((k for k, (a, b) in enumerate(zip(ours[:n], theirs[:n])) if a != b), None)
    if i is not None:
        margin = float(rows[i][theirs[i]] - rows[i][ours[i]])
        assert margin < 3 * gap, f"diverged at token {i} with margin {margin:.4f} (gap {gap:.4f})"
    engine.close()
