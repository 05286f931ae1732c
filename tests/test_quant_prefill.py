"""Prompt-sized products on GGML weights (kernels/ggml_gemm.py, csrc/ggml_gemm.cpp) are row-invariant: every output
row is the bits the one-token kernels give for that row alone (ggml's vec_dot, or for interleaved Q4_K its gemm 4
rows at a time against its gemv one at a time), whatever the number of rows, their grouping or the threads; and a
layer's routed experts for many tokens in one call sum each token's experts as the decode does.

Shape legend: T tokens, H hidden, I expert intermediate size, E experts, R experts per token.
"""
from __future__ import annotations

import pytest
import torch

from ggml_support import GGML, interleaved, interleaves_q4_k, random_weight
from moepage.kernels import ggml_gemm
from moepage.kernels.ggml_experts import experts_one_token

pytestmark = pytest.mark.skipif(GGML is None or ggml_gemm.backend() is None,
                                reason="ggml's CPU library (libggml-python) or the C++ build is unavailable here")

INTERLEAVED_Q4_K = pytest.param("Q4_K-interleaved", marks=pytest.mark.skipif(
    not interleaves_q4_k(), reason="ggml has no interleaved Q4_K kernel for this CPU (AVX2, or NEON with int8 matmul)"))
TYPES = ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", INTERLEAVED_Q4_K]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def weight(qtype: str, rows: int, cols: int, seed: int):
    w, _ = random_weight(qtype.split("-")[0], rows, cols, seed=seed)
    return interleaved(w) if qtype.endswith("-interleaved") else w


def one_row(x: torch.Tensor, w) -> torch.Tensor:
    """The decode's product for one row (ggml_cpu: vec_dot, or the interleaved layout's gemv)."""
    return GGML.linear(x, w.data, w.kernel_type, w.shape[0])


@pytest.mark.parametrize("qtype", TYPES)
def test_rows_do_not_depend_on_the_batch(qtype, two_threads):
    """17 rows in one call: every sub-batch (1, 3, 4, 5, 8 rows at any offset, so the gemm's 4-row groups and
    their padding fall elsewhere) gives the same rows bit for bit; vec_dot types equal the decode's one-row product
    bit for bit, interleaved Q4_K (ggml's gemm) within float32 summation order of its gemv."""
    w = weight(qtype, 264, 512, seed=7)
    x = torch.randn(17, 512, generator=torch.Generator().manual_seed(1))
    many = ggml_gemm.linear(x, w)
    assert many is not None and many.shape == (17, 264)
    for a, n in ((0, 1), (16, 1), (2, 3), (1, 4), (5, 5), (9, 8)):
        assert torch.equal(ggml_gemm.linear(x[a:a + n], w), many[a:a + n]), f"{qtype}: rows {a}..{a + n}"
    for t in range(17):
        one = one_row(x[t:t + 1], w)
        if w.interleaved:
            assert torch.allclose(many[t:t + 1], one, rtol=1e-5, atol=1e-6 * one.abs().max().item())
        else:
            assert torch.equal(many[t:t + 1], one), f"{qtype}: row {t} differs from the one-row kernel"


@pytest.mark.skipif(not interleaves_q4_k(), reason="no interleaved Q4_K kernel on this CPU")
def test_interleaved_gemm_is_in_use_and_close_to_its_gemv():
    """Interleaved Q4_K goes through ggml's 4x8 gemm (its bits differ from the gemv's in the last places: another
    summation order) and the gemv path (set_gemm(False)) is the decode's bits exactly."""
    m = ggml_gemm.backend()
    assert m.has_gemm()
    w = weight("Q4_K-interleaved", 1024, 1024, seed=3)
    x = torch.randn(9, 1024, generator=torch.Generator().manual_seed(2)) * 3
    with_gemm = ggml_gemm.linear(x, w)
    was = m.set_gemm(False)
    try:
        gemv_only = ggml_gemm.linear(x, w)
    finally:
        m.set_gemm(was)
    assert torch.equal(gemv_only, torch.cat([one_row(x[t:t + 1], w) for t in range(9)]))
    assert not torch.equal(with_gemm, gemv_only)
    assert torch.allclose(with_gemm, gemv_only, rtol=1e-5, atol=1e-6 * gemv_only.abs().max().item())


def random_experts(types, E, H, I):
    experts = []
    for e in range(E):
        g, u, d = (weight(t, r, c, seed=100 * e + k) for k, (t, r, c) in enumerate(zip(types, (I, I, H), (H, H, I))))
        experts.append(type("Expert", (), {"gate": g, "up": u, "down": d})())
    return experts


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q4_K", "Q4_K", "Q5_0"), ("Q4_0", "Q4_0", "Q8_0"),
                                   pytest.param(("Q4_K-interleaved", "Q4_K-interleaved", "Q6_K"),
                                                marks=INTERLEAVED_Q4_K.marks)])
def test_experts_for_many_tokens(types, two_threads):
    """experts_accumulate over 11 tokens routed to 6 experts (top-3): in one call or in two batches of ids, for all
    tokens or any subset of them, each token gets the same bits; and the decode's fused one-token result (experts in
    ascending order, fp32 sum), bit for bit where every product is vec_dot, within float32 rounding through the gemm."""
    H, I, E, T, R = 256, 256, 6, 11, 3
    experts = random_experts(types, E, H, I)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, generator=gen)
    indices = torch.stack([torch.randperm(E, generator=gen)[:R] for _ in range(T)])  # [T, R]
    weights = torch.softmax(torch.randn(T, R, generator=gen), dim=-1)
    kinds = ggml_gemm.fusable(experts)
    assert kinds is not None
    acc = torch.zeros(T, H)
    ggml_gemm.experts_accumulate(acc, x, indices, weights, [0, 1, 2], experts[:3], kinds)
    ggml_gemm.experts_accumulate(acc, x, indices, weights, [3, 4, 5], experts[3:], kinds)
    whole = torch.zeros(T, H)
    ggml_gemm.experts_accumulate(whole, x, indices, weights, list(range(E)), experts, kinds)
    assert torch.equal(acc, whole)
    some = [1, 4, 5, 9]
    part = torch.zeros(len(some), H)
    ggml_gemm.experts_accumulate(part, x[some], indices[some], weights[some], list(range(E)), experts, kinds)
    assert torch.equal(part, whole[some])
    for t in range(T):
        order = sorted(range(R), key=lambda r: int(indices[t, r]))
        picked = [experts[int(indices[t, r])] for r in order]
        one = experts_one_token(x[t:t + 1], [(p.gate, p.up, p.down) for p in picked],
                                [float(weights[t, r]) for r in order])
        if "interleaved" in types[0]:
            assert torch.allclose(acc[t:t + 1], one, rtol=1e-4, atol=1e-5 * one.abs().max().item())
        else:
            assert torch.equal(acc[t:t + 1], one), f"token {t}"


def test_fusable_declines_mixed_types():
    a = type("Expert", (), {k: random_weight("Q4_K", 256, 256, seed=i)[0] for i, k in enumerate(("gate", "up", "down"))})()
    b = type("Expert", (), {k: random_weight("Q4_0", 256, 256, seed=i)[0] for i, k in enumerate(("gate", "up", "down"))})()
    assert ggml_gemm.fusable([a, a]) is not None
    assert ggml_gemm.fusable([a, b]) is None
    assert ggml_gemm.fusable([object()]) is None


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory, tokenizer_dir):
    """{family: path} of a tiny Q4_K_M GGUF per family (qwen2_moe has a shared expert)."""
    from gguf_support import tiny_q4_k_m

    return tiny_q4_k_m(tmp_path_factory.mktemp("gguf-quant-prefill"), tokenizer_dir)


def prefill_logits(path: str, dtype: str, gemm: bool, monkeypatch) -> torch.Tensor:
    """logits [35, V] (float32) of a 35-token prefill, through these kernels or (gemm False) the previous path."""
    from moepage.engine.engine import Engine, EngineConfig

    engine = Engine.load(EngineConfig(path, dtype=dtype, tokenizer=False, ctx_size=64))
    try:
        with monkeypatch.context() as m:
            if not gemm:
                m.setattr(ggml_gemm, "_module", [None])
            ids = torch.arange(5, 40)
            out = engine.model.forward(ids, engine.model.new_kv_cache(64), all_logits=True)
            again = engine.model.forward(ids, engine.model.new_kv_cache(64), all_logits=True)
        assert torch.equal(out, again)
        return out.float()
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_prefill_matches_the_dequantized_path(q4_k_m, family, monkeypatch, two_threads):
    """A 35-token prefill through these kernels against the previous path (weights dequantized, torch's GEMM on the
    same rounded activations), deterministic: in float32 the logits of every position agree to within a few steps of
    the activations' 8-bit rounding (a summation-order difference upstream can move a value across a rounding step:
    ~1% of the logits' scale here); in bfloat16 they are no farther from the float32 logits than the previous
    bfloat16 path's."""
    path = q4_k_m[family]
    new, old = prefill_logits(path, "float32", True, monkeypatch), prefill_logits(path, "float32", False, monkeypatch)
    scale = old.abs().max().item()
    assert (new - old).abs().max().item() <= 0.03 * scale, f"{family}: {(new - old).abs().max().item()} of {scale}"
    new16, old16 = prefill_logits(path, "bfloat16", True, monkeypatch), prefill_logits(path, "bfloat16", False, monkeypatch)
    err_new, err_old = (new16 - old).abs().mean().item(), (old16 - old).abs().mean().item()
    assert err_new <= 1.5 * err_old, f"{family} bfloat16: mean |error| {err_new} against the previous {err_old}"


def test_reused_prompt_prefixes_of_a_q4_k_m_gguf_are_exact(q4_k_m):
    """Prompt re-use on a quantized GGUF (16-token chunks, so the re-used prefix and the fresh prefill split the
    prompt into the same chunks): each turn's greedy tokens and log-probabilities (the logits' bits) equal a prefill
    from the first token, with a title request in between."""
    from conftest import prompt_ids
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.sampling import SamplingParams

    def load(**over):
        return Engine.load(EngineConfig(model=q4_k_m["qwen3_moe"], ctx_size=256, threads=1, dtype="bfloat16",
                                        tokenizer=False, prefill_chunk=16, **over))

    def greedy(engine, ids):
        steps = list(engine.generate(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)))
        return [s.token for s in steps], [s.logprob for s in steps]

    plain, cached = load(), load(prefix_cache=True)
    try:
        vocab = plain.args.vocab_size
        turn = prompt_ids(53, vocab, seed=3)
        assert greedy(cached, turn) == greedy(plain, turn)
        title = prompt_ids(29, vocab, seed=5)
        assert greedy(cached, title) == greedy(plain, title)
        longer = turn + prompt_ids(21, vocab, seed=10)
        assert greedy(cached, longer) == greedy(plain, longer)
        assert cached.last_stats.cached_prompt_tokens >= len(turn) // 16 * 16 > 0
    finally:
        plain.close()
        cached.close()
