"""Quantized matvecs through ggml's CPU kernels (moepage/kernels/ggml_cpu.py) against float64 products of
gguf-py's dequantized weights.

The kernels multiply the stored weight by the activation converted to the weight's vec_dot type, as llama.cpp
does. Bound used, per output row n: |y_n - sum_i W_ni x_i| <= sum_i |W_ni| delta_i + 1e-5 sum_i |W_ni x_i|, where
delta_i bounds the activation's rounding: for Q8_0 blocks (Q4_0..Q8_0, IQ4_NL) d/2 + 127 d 2^-11 with
d = amax/127 of x_i's 32-block (the f16 scale's rounding), for Q8_K blocks (K-quants, IQ4_XS) d/2 with
d = amax/127 of its 256-block, 2^-11 |x_i| for F16 and 2^-8 |x_i| for BF16; the second term is float32
accumulation.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ggml_support import GGML, interleaved, interleaves_q4_k, random_weight
from moepage.kernels.ggml_experts import experts_one_token, swiglu_quantized
from moepage.kernels.ggml_linear import ggml_linear

pytestmark = pytest.mark.skipif(GGML is None, reason="ggml's CPU library (libggml-python) or the C++ build is "
                                                      "unavailable here; moepage uses torch")

Q8_0_ACTIVATION = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]
Q8_K_ACTIVATION = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
TYPES = Q8_0_ACTIVATION + Q8_K_ACTIVATION + ["F16", "BF16"]
def activation_rounding(x: np.ndarray, qtype: str) -> np.ndarray:
    """Per-element bound of |x - the activation ggml multiplies| (see the module docstring)."""
    if qtype == "F16":
        return np.abs(x) * 2.0**-11
    if qtype == "BF16":
        return np.abs(x) * 2.0**-8
    block = 32 if qtype in Q8_0_ACTIVATION else 256
    d = np.abs(x.reshape(x.shape[0], -1, block)).max(axis=-1, keepdims=True) / 127
    per = d / 2 + (127 * d * 2.0**-11 if block == 32 else 0)
    return np.broadcast_to(per, (*per.shape[:-1], block)).reshape(x.shape)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_matvec_within_the_activation_rounding(qtype, rows, threads):
    cols = 512
    w, ref = random_weight(qtype, rows, cols, seed=TYPES.index(qtype) * 10 + rows)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(rows))
    got = ggml_linear(x, w).double().numpy()  # 3 rows: the vec_dot path
    xd = x.double().numpy()
    want = xd @ ref.T
    bound = activation_rounding(xd, qtype) @ np.abs(ref).T + 1e-5 * (np.abs(xd) @ np.abs(ref).T)
    assert got.shape == (3, rows)
    assert np.all(np.abs(got - want) <= bound), f"{qtype}: worst excess {np.max(np.abs(got - want) - bound)}"


INTERLEAVED_Q4_K = pytest.param("Q4_K-interleaved", marks=pytest.mark.skipif(
    not interleaves_q4_k(), reason="ggml has no interleaved Q4_K kernel for this CPU (AVX2, or NEON with int8 matmul)"))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q4_K", "Q6_K", "IQ4_XS", INTERLEAVED_Q4_K])
def test_rows_do_not_depend_on_threads_or_batching(qtype):
    """Each output is one vec_dot of one weight row (or one 8-row pass of the interleaved kernel, split between
    tasks at 8-row groups): the same bits with 1 or 2 threads, alone or with other rows, and the prefill path (T > 8:
    dequantize + GEMM on the same rounded activations) is close to it."""
    layout = qtype.endswith("-interleaved")
    w, _ = random_weight(qtype.split("-")[0], 4096 if layout else 45, 256, seed=3)  # 4096 rows: many tasks
    w = interleaved(w) if layout else w
    assert w.interleaved == layout
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ggml_linear(x, w)
        torch.set_num_threads(2)
        two = ggml_linear(x, w)
        row = ggml_linear(x[5:6], w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(row, one[5:6])
    many = ggml_linear(x.repeat(2, 1), w)  # 16 rows: dequantize + F.linear
    assert torch.allclose(many[:8], one, rtol=1e-4, atol=1e-4 * one.abs().max().item())


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q4_K", "Q4_K", "Q5_0"), ("Q4_0", "Q4_0", "Q8_0"),
                                   ("IQ4_XS", "IQ4_XS", "IQ4_XS"), pytest.param(
                                       ("Q4_K", "Q4_K", "Q4_K", "interleaved"), marks=INTERLEAVED_Q4_K.marks)])
def test_experts_one_token_equals_expert_by_expert(types, threads):
    """The fused call (one activation conversion for every gate/up, one per expert for its down) sums the same
    per-expert outputs as swiglu_quantized, expert by expert, in list order (plain or interleaved weights)."""
    H, I, E = 256, 256, 5
    layout = interleaved if types[3:] == ("interleaved",) else (lambda q: q)
    experts = [tuple(layout(random_weight(t, r, c, seed=100 * e + k)[0])
                     for k, (t, r, c) in enumerate(zip(types[:3], (I, I, H), (H, H, I)))) for e in range(E)]
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(9))
    weights = [0.4, 0.25, 0.15, 0.12, 0.08]
    residual = torch.randn(1, H, generator=torch.Generator().manual_seed(10))
    got = experts_one_token(x, experts, weights, residual)
    want = residual.clone()
    for (g, u, d), wt in zip(experts, weights):
        want += wt * swiglu_quantized(x, g, u, d)
    assert got is not None and got.shape == (1, H)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_experts_one_token_declines_what_it_cannot_fuse():
    """Mixed types across experts, or more than one token: None, and the caller computes expert by expert."""
    a = tuple(random_weight("Q4_K", 256, 256, seed=k)[0] for k in range(3))
    b = tuple(random_weight("Q4_0", 256, 256, seed=k)[0] for k in range(3))
    x = torch.randn(1, 256)
    assert experts_one_token(x, [a, b], [0.5, 0.5]) is None
    assert experts_one_token(torch.randn(2, 256), [a], [1.0]) is None


def test_many_small_calls_finish_quickly(threads):
    """The pool hands out and collects work for thousands of back-to-back calls (no lost wake-up, no hang)."""
    import time

    w, _ = random_weight("Q4_K", 64, 256, seed=6)
    x = torch.randn(1, 256)
    first = ggml_linear(x, w)
    t0 = time.perf_counter()
    for _ in range(3000):
        assert torch.equal(ggml_linear(x, w), first)
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_argmax_is_torchs_argmax_and_refuses_nan_and_inf(dtype):
    """The greedy sampler's one pass (kernels/ggml_cpu.py finite_argmax): torch.argmax's first-of-ties index on
    finite logits (many ties: values drawn from a few levels), -1 once any value is NaN, +inf or -inf."""
    from moepage.kernels.ggml_cpu import finite_argmax

    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 33, 1023, 1024, 1025, 2063, 151_936):  # lane and block tails
        for _ in range(3):
            x = torch.randint(-4, 4, (n,), generator=g).to(dtype) * 0.5
            assert finite_argmax(x) == int(torch.argmax(x))
            for bad in (float("nan"), float("inf"), float("-inf")):
                y = x.clone()
                y[int(torch.randint(0, n, (1,), generator=g))] = bad
                assert finite_argmax(y) == -1
    assert finite_argmax(torch.zeros(4, dtype=torch.float16)) is None  # not a type it reads: torch's ops run
