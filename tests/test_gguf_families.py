"""Every GGUF architecture moepage reads (qwen3moe, qwen2moe, llama with experts, olmoe), converted by llama.cpp:
F32 logits equal the Hugging Face checkpoint's, F16 greedy tokens equal llama.cpp's own."""
from __future__ import annotations

import pytest
import torch

from gguf_support import LlamaCppGreedy, convert, find_converter, make_gguf_source
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.sampling import SamplingParams

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


@pytest.fixture(scope="session")
def family_ggufs(tmp_path_factory, tokenizer_dir):
    """{family: {'hf', 'f32', 'f16'}}, converted in one converter process."""
    root = tmp_path_factory.mktemp("gguf-families")
    converter = find_converter(str(root))
    out, jobs = {}, []
    for i, family in enumerate(FAMILIES):
        hf = make_gguf_source(root / family, family, tokenizer_dir, seed=10 + i)
        out[family] = {"hf": str(hf), "f32": str(root / f"{family}-f32.gguf"), "f16": str(root / f"{family}-f16.gguf")}
        jobs += [(hf, out[family]["f32"], "f32"), (hf, out[family]["f16"], "f16")]
    convert(converter, jobs)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_logits_equal_hf(family, family_ggufs):
    paths = family_ggufs[family]
    hf = Engine.load(EngineConfig(paths["hf"], dtype="float32"))
    gg = Engine.load(EngineConfig(paths["f32"], dtype="float32"))
    assert gg.ckpt.kind == "gguf" and gg.args.family == hf.args.family
    ids = gg.tokenizer.encode("class Stack:\n    def push(self, item):\n        self.items.append(item)\n")
    assert ids == hf.tokenizer.encode("class Stack:\n    def push(self, item):\n        self.items.append(item)\n")
    diff = (hf.logits_all(ids) - gg.logits_all(ids)).abs().max().item()
    assert diff < 1e-4, f"{family}: max abs logit diff {diff}"
    hf.close(), gg.close()


# llama.cpp multiplies F16 weights by activations rounded to f16, so a router whose k-th and (k+1)-th logits are
# closer than this can pick a different expert there than a float32 reference does; from that token on the two
# caches hold different values. Measured: the tiny Mixtral's layer-0 router at its 45th token has top-2 margin 0.0017,
# and llama.cpp's logits move by 3.7 exactly there (and only there: before it they agree within 0.007).
ROUTER_TIE = 0.01


def first_router_tie(hf_dir: str, ids: list[int], top_k: int) -> int:
    """The first position where some layer's router (transformers, float32) has its k-th and (k+1)-th logits within
    ROUTER_TIE, or len(ids)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        router = model(torch.tensor([ids]), output_router_logits=True).router_logits
    top = torch.stack([r.reshape(len(ids), -1).topk(top_k + 1, dim=-1).values for r in router])  # [L, T, k+1]
    tied = ((top[..., top_k - 1] - top[..., top_k]) < ROUTER_TIE).any(0).nonzero()
    return int(tied[0]) if len(tied) else len(ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_greedy_equals_llama_cpp(family, family_ggufs):
    """32 greedy tokens equal llama.cpp's, or the first divergence is a near-tie: llama.cpp's own margin there is
    below 3x the largest moepage/llama.cpp logit difference measured teacher-forced on llama.cpp's tokens. Logits are
    compared up to the first router near-tie (ROUTER_TIE), which must come after at least 16 generated tokens."""
    path = family_ggufs[family]["f16"]
    engine = Engine.load(EngineConfig(path, dtype="float32"))
    ids = engine.tokenizer.encode("import os\nimport sys\n\ndef main():\n")
    ours = [s.token for s in engine.generate(ids, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))]
    llm = LlamaCppGreedy(path)
    try:
        theirs, rows = llm.generate(ids, 32)
    finally:
        llm.close()
    n = min(32, first_router_tie(family_ggufs[family]["hf"], ids + theirs, engine.args.top_k) - len(ids) + 1)
    print(f"\n{family}: compared {n} tokens")
    assert n >= 16, f"{family}: a router near-tie after {n} tokens; pick a prompt without one"
    logits = engine.logits_all(ids + theirs)[len(ids) - 1 : len(ids) - 1 + n]
    gap = (logits - torch.stack([torch.from_numpy(r) for r in rows[:n]])).abs().max().item()
    assert gap < 0.02, f"{family}: logits differ from llama.cpp's by {gap} within {n} tokens"
    i = next((k for k, (a, b) in enumerate(zip(ours[:n], theirs[:n])) if a != b), None)
    if i is not None:
        margin = float(rows[i][theirs[i]] - rows[i][ours[i]])
        print(f"\n{family}: first divergence at token {i}, llama.cpp margin {margin:.4f}, logit gap {gap:.4f}")
        assert margin < 3 * gap, f"{family}: diverged at token {i} with margin {margin:.4f} (gap {gap:.4f})"
    engine.close()
