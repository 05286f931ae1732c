"""bench/synthetic_gguf.py: a 2-layer synthetic GGUF of each GGML type it writes (and llama.cpp's Q4_K_M mix, with
uniform and skewed routing) loads in llama.cpp and in moepage, and both give the same greedy tokens (to the first
near-tie in llama.cpp's own logits)."""
from __future__ import annotations

import os
import sys
import tarfile

import numpy as np
import pytest
import torch

from gguf_support import CANDIDATES, LLAMA_CPP_VERSION, LlamaCppGreedy, llama_cpp_module
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.sampling import SamplingParams
from moepage.paging.gguf_file import GGUFFile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import synthetic_gguf as sg  # noqa: E402

N = 8
TYPES = ["Q4_K_M", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
         "IQ4_XS", "F16", "BF16"]
NEAR_TIE = 0.25  # logits of a random model: std ~1; llama.cpp rounds activations to 8 bits for K-quants


@pytest.fixture(scope="session")
def qwen2_vocab(tmp_path_factory) -> str:
    """llama.cpp's models/ggml-vocab-qwen2.gguf, from the llama-cpp-python sdist."""
    name = "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
    for c in CANDIDATES:
        p = os.path.expanduser(c.format(v=LLAMA_CPP_VERSION))
        if os.path.isdir(p) and os.path.exists(os.path.join(p, "models", "ggml-vocab-qwen2.gguf")):
            return os.path.join(p, "models", "ggml-vocab-qwen2.gguf")
        if os.path.isfile(p) and p.endswith(".tar.gz"):
            out = tmp_path_factory.mktemp("vocab")
            with tarfile.open(p) as tar:
                m = next((m for m in tar.getmembers() if m.name.endswith(name)), None)
                if m is None:
                    continue
                m.name = "ggml-vocab-qwen2.gguf"
                tar.extractall(out, members=[m], filter="data")
            return str(out / "ggml-vocab-qwen2.gguf")
    pytest.skip(f"the llama-cpp-python {LLAMA_CPP_VERSION} sdist (with {name}) is not on this machine")


ZIPF = 2.0  # 8 experts: a strong skew, so 24 tokens show it


def make(tmp_path, vocab: str, quant: str, routing: str = "uniform") -> str:
    out = str(tmp_path / f"{quant}-{routing}.gguf")
    sg.write_gguf(out, sg.SHAPES["tiny"], quant, vocab, sg.Routing(routing, ZIPF, seed=1), seed=1, progress=False)
    return out


def agree_until_near_tie(path: str) -> tuple[int, float]:
    """(tokens compared, first divergence's llama.cpp margin or 0): moepage's greedy vs llama.cpp's."""
    engine = Engine.load(EngineConfig(path, dtype="float32"))
    try:
        ids = engine.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
        ours = [s.token for s in engine.generate(ids, SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))]
    finally:
        engine.close()
    llm = LlamaCppGreedy(path)
    try:
        theirs, rows = llm.generate(ids, N)
    finally:
        llm.close()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i, float(rows[i][b] - rows[i][a])
    return N, 0.0


@pytest.mark.parametrize("quant", TYPES)
def test_synthetic_file_loads_in_both_and_greedy_agrees(tmp_path, qwen2_vocab, quant):
    llama_cpp_module()
    path = make(tmp_path, qwen2_vocab, quant)
    f = GGUFFile(path)
    try:
        expert_types = {f.info(f"blk.{L}.ffn_{p}_exps.weight").type.name for p in ("gate", "up", "down")
                        for L in (0, 1)}
        assert expert_types == ({"Q4_K", "Q6_K"} if quant == "Q4_K_M" else {quant})
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 151936
    finally:
        f.close()
    n, margin = agree_until_near_tie(path)
    assert n == N or margin < NEAR_TIE, f"{quant}: diverged at token {n} with llama.cpp margin {margin:.3f}"


def test_q4_k_m_mix_follows_llama_quant():
    s = sg.SHAPES["qwen3-30b-a3b"]
    types = {p.name: p.type for p in sg.plan(s, 151936, "Q4_K_M")}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    six = [L for L in range(48) if types[f"blk.{L}.ffn_down_exps.weight"] == "Q6_K"]
    assert six == [L for L in range(48) if L < 6 or L >= 42 or (L - 6) % 3 == 2] and len(six) == 24
    assert {types[f"blk.{L}.ffn_gate_exps.weight"] for L in range(48)} == {"Q4_K"}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    total = sum(sg.nbytes_of(p) for p in sg.plan(s, 151936, "Q4_K_M"))
    assert 18.0e9 < total < 19.0e9  # the published Qwen3-30B-A3B-Q4_K_M.gguf is 18.6 GB


def popular_share(path: str, tmp_path, k: int = 2) -> float:
    """Share of layer 1's expert accesses that go to its k most biased experts, over 24 seeded-sampled tokens."""
    trace = str(tmp_path / "trace.jsonl")
    engine = Engine.load(EngineConfig(path, dtype="float32", trace=trace))
    try:
        ids = engine.tokenizer.encode("The quick brown fox")
        list(engine.generate(ids, SamplingParams(max_tokens=24, temperature=1.0, top_k=40, seed=3, ignore_eos=True)))
        w = engine.ckpt.read_tensor("blk.1.ffn_gate_inp.weight")
    finally:
        engine.close()
    bias = w[:, : sg.CHANNEL].sum(1)
    top = set(torch.argsort(bias, descending=True)[:k].tolist())
    import json

    hits = [json.loads(line)["e"] for line in open(trace) if json.loads(line)["l"] == 1]
    return sum(e in top for e in hits) / len(hits)


def test_skewed_routing_is_skewed_and_patchable(tmp_path, qwen2_vocab):
    """The skewed file routes layer 1's tokens to its two most biased experts far more often than the uniform file
    does (2 of 8 experts, top-2), greedy still agrees with llama.cpp, and --patch-routing turns the uniform file
    into the skewed one byte for byte."""
    llama_cpp_module()
    uni, skew = make(tmp_path, qwen2_vocab, "Q4_K_M", "uniform"), make(tmp_path, qwen2_vocab, "Q4_K_M", "skewed")
    n, margin = agree_until_near_tie(skew)
    assert n == N or margin < NEAR_TIE
    s_uni, s_skew = popular_share(uni, tmp_path), popular_share(skew, tmp_path)
    print(f"\nlayer 1, 2 most biased of 8 experts: {s_uni:.0%} of accesses (uniform), {s_skew:.0%} (skewed)")
    assert s_skew > s_uni + 0.15
    sg.patch_routing(uni, sg.Routing("skewed", ZIPF, seed=1))
    with open(uni, "rb") as a, open(skew, "rb") as b:
        assert a.read() == b.read()


def test_gguf_experts_page_into_recycled_slots(tmp_path, qwen2_vocab, monkeypatch):
    """An expert read into a reused slot has the bytes of a fresh read; under a 3-expert cache every page-in after
    the first three reuses an evicted expert's slot (no fresh pages to fault in: at the 6 GB cap of the full-shape
    bench that was most of the page-in threads' system time), and the tokens equal an unlimited run's."""
    from moepage.engine import quantized_expert
    from moepage.engine.gguf_checkpoint import open_gguf
    from moepage.paging.gguf_experts import PARTS
    from moepage.paging.pread import aligned_bytes

    path = make(tmp_path, qwen2_vocab, "Q4_K_M")
    ckpt = open_gguf(path)
    src = ckpt.experts
    slot = aligned_bytes(src.slot_nbytes())
    slot.fill_(0xAB)
    for layer, e in [(0, 3), (1, 5), (1, 0)]:
        fresh, again = src.read_quantized(layer, e), src.read_quantized(layer, e, into=slot)
        for p in PARTS:
            t = getattr(again, p).data
            assert torch.equal(getattr(fresh, p).data, t)
            assert slot.data_ptr() <= t.data_ptr() < slot.data_ptr() + slot.numel()
    ckpt.experts.file.close()

    allocated = []
    real = quantized_expert.aligned_bytes

    def counted(n):
        allocated.append(n)
        return real(n)

    monkeypatch.setattr(quantized_expert, "aligned_bytes", counted)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, seed=3, ignore_eos=True)
    runs = {}
    for name, cache in (("unlimited", None), ("three", 3 * src.slot_nbytes())):
        allocated.clear()
        engine = Engine.load(EngineConfig(path, dtype="float32", expert_cache_bytes=cache))
        try:
            ids = engine.tokenizer.encode("The quick brown fox")
            runs[name] = [s.token for s in engine.generate(ids, params)]
            stats = engine.cache.stats.snapshot()
            values = [e.value for e in engine.cache._entries.values()]
        finally:
            engine.close()
        assert all(v.buffer is not None and v.gate.data.data_ptr() >= v.buffer.data_ptr() for v in values)
    assert stats["evictions"] >= 6 and len(allocated) <= 3
    assert runs["three"] == runs["unlimited"]


def test_split_of_a_gguf_restarts_where_it_stopped(tmp_path, qwen2_vocab, monkeypatch):
    """A split killed half-way and run again writes only the shards it lacks (and one whose bytes were damaged
    since), and ends with the manifest of a split run in one go."""
    import moepage.surgery.split_gguf as sgg

    path = make(tmp_path, qwen2_vocab, "Q4_K_M")
    whole = sgg.split_gguf(path, str(tmp_path / "whole"))

    class Stop(Exception):
        pass

    def stop_at(n):
        def progress(done, total):
            if done == n:
                raise Stop

        return progress

    out = str(tmp_path / "restarted")
    with pytest.raises(Stop):
        sgg.split_gguf(path, out, progress=stop_at(6))
    assert not os.path.exists(os.path.join(out, "moepage.json"))
    shard = os.path.join(out, "experts", "L000", "E0002.safetensors")
    with open(shard, "r+b") as f:  # a shard damaged after it was recorded: rewritten, not trusted
        f.seek(200)
        f.write(b"\xff")
    written = []
    save = sgg.save_file
    monkeypatch.setattr(sgg, "save_file", lambda t, to, metadata: (written.append(to), save(t, to, metadata=metadata)))
    again = sgg.split_gguf(path, out)
    total = len(whole["files"]) - 1  # expert shards
    assert len(written) == total - 6 + 1
    assert {k: v["bytes"] for k, v in again["files"].items()} == {k: v["bytes"] for k, v in whole["files"].items()}
    assert not os.path.exists(os.path.join(out, sgg.JOURNAL))
    from safetensors import safe_open

    from moepage.surgery.split import verify_split

    assert verify_split(out) == []
    for rel in whole["files"]:  # the same tensors and metadata (safetensors orders metadata keys at random)
        if rel.endswith(".safetensors"):
            a, b = safe_open(os.path.join(tmp_path, "whole", rel), "pt"), safe_open(os.path.join(out, rel), "pt")
            assert a.metadata() == b.metadata()
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_layer_major_prefill_of_a_quantized_gguf_is_exact(tmp_path, qwen2_vocab):
    """Q4_K_M experts under a budget of 2.5 layers' experts: a 96-token prompt in 32-token chunks (experts get more
    rows than ggml's vec_dot path takes, so the GEMM path runs too) prefills layer by layer to the unlimited
    chunk-by-chunk logits, bit for bit."""
    shape = sg.Shape("qwen3moe", 4, 8, 2, 256, 256, 4, 2, 64, context=4096, name="4-layer tiny")
    path = str(tmp_path / "four.gguf")
    sg.write_gguf(path, shape, "Q4_K_M", qwen2_vocab, sg.Routing(), seed=3, progress=False)
    ids = list(range(1000, 1096))
    full = Engine.load(EngineConfig(path, prefill_chunk=32, threads=1, tokenizer=False))
    want = full.prefill(ids)
    each = full.plan.expert_bytes_each
    full.close()
    paged = Engine.load(EngineConfig(path, prefill_chunk=32, threads=1, tokenizer=False, preload=False,
                                     expert_cache_bytes=int(2.5 * 8 * each)))
    assert paged.plan.fraction_resident < 1.0
    got = paged.prefill(ids)
    assert paged.cache.stats.snapshot()["bytes_read"] <= 4 * 8 * each + 8 * each  # once per layer (+ guesses)
    assert torch.equal(got, want)
    paged.close()
