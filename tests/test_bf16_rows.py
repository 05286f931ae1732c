"""The row-invariant multi-row kernels (moepage/kernels/csrc/bf16_rows.h): B rows through the lm_head (bf16 and the
12-bit PackedMatrix), through a layer's routed experts and through its attention half in one call give, byte for byte, what B separate one-row
calls of bf16_decode / bf16_unpack give, on this machine's build and on the haswell (AVX2, portable core) build.
A later change to the one-row kernels' order of sums that the multi-row kernels do not follow fails here.

Shape legend: B rows, K input features, N output rows, H hidden, I expert FFN width, U distinct experts.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from moepage.kernels import bf16_rows, cpu_bf16, native
from moepage.paging.bf16_12bit import PackedMatrix, fused_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = torch.Generator().manual_seed(7)
LINEAR = [(4, 768, 1000), (3, 1000, 37), (8, 77, 9), (2, 16, 5), (5, 5, 3), (1, 2048, 64)]  # B, K, N: dot's tails
LINEAR12 = [(4, 768, 700, 256), (3, 128, 9, 4), (6, 64, 33, 16)]  # B, K, N, rows per table


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, generator=G) * scale).bfloat16()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if bf16_rows.module() is None:
        pytest.skip("the bf16 kernels do not build here (no C++ compiler, or MOEPAGE_KERNELS=torch)")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_the_rows_run_on_the_one_row_core_of_this_build():
    want = "avx512bf16" if "avx512_bf16" in native.target_flags() else "portable"
    assert bf16_rows.module().core() == want
    assert native.load("bf16_decode").core().startswith(want)


@pytest.mark.parametrize("B,K,N", LINEAR)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_rows_equal_one_row_calls(B, K, N, bias):
    x, w = rand(B, K), rand(N, K, scale=0.05)
    b = rand(N) if bias else None
    got = bf16_rows.module().linear_rows(x, w, b)
    want = torch.cat([cpu_bf16.linear(x[i : i + 1], w, b) for i in range(B)])
    assert same_bytes(got, want)


def test_the_batched_linear_would_not_do():
    """Where the one-row core sums in another order than bf16_decode's multi-row gemv (AVX512-BF16), the plain batched
    product differs from the rows alone somewhere: the equality above is not a matter of luck."""
    if bf16_rows.module().core() != "avx512bf16":
        pytest.skip("the portable core's multi-row gemv is row-invariant already")
    x, w = rand(4, 768), rand(2000, 768, scale=0.05)
    alone = torch.cat([cpu_bf16.linear(x[i : i + 1], w) for i in range(4)])
    assert not same_bytes(cpu_bf16.linear(x, w), alone)
    assert same_bytes(bf16_rows.module().linear_rows(x, w), alone)


def packed(N, K, T):
    """A PackedMatrix of normal weights with odd (finite) bit patterns mixed in: many escapes, one table per T rows."""
    w = rand(N, K, scale=0.02)
    odd = torch.randint(-(2**15), 2**15, w.shape, generator=G, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    w = torch.where((torch.rand(w.shape, generator=G) < 0.05) & odd.float().abs().lt(1e3), odd, w)
    rows, PackedMatrix.ROWS = PackedMatrix.ROWS, T
    try:
        m = PackedMatrix.of(w)
    finally:
        PackedMatrix.ROWS = rows
    m.ROWS = T  # the instance keeps its table size
    return w, m


@pytest.mark.parametrize("B,K,N,T", LINEAR12)
def test_12bit_rows_equal_one_row_calls(B, K, N, T):
    w, m = packed(N, K, T)
    assert m.exc.numel() > 0
    x = rand(B, K)
    got = bf16_rows.lm_head_rows(x, m)
    alone = torch.cat([m.linear(x[i : i + 1], cpu_bf16.linear) for i in range(B)])  # what model.forward computes
    assert same_bytes(got, alone)
    assert same_bytes(got, bf16_rows.lm_head_rows(x, w))  # and the bf16 matrix's rows
    if fused_kernel() is not None:
        assert same_bytes(alone, torch.cat([cpu_bf16.linear(x[i : i + 1], w) for i in range(B)]))


def test_12bit_rows_reject_parts_that_do_not_fit():
    _, m = packed(9, 128, 4)
    bad = m.row_exc.clone()
    bad[3] = bad[4] + 1  # a row whose escapes end before they start
    with pytest.raises(RuntimeError, match="row_exc"):
        bf16_rows.module().linear_rows_12bit(rand(2, 128), m.lo, m.codes, m.exc, bad, m.luts, 4)
    with pytest.raises(RuntimeError, match="parts do not fit"):
        bf16_rows.module().linear_rows_12bit(rand(2, 128), m.lo[:-64], m.codes, m.exc, m.row_exc, m.luts, 4)


def experts(U, H, widths):
    return [rand(2 * widths[u % len(widths)], H, scale=0.05) for u in range(U)], \
           [rand(H, widths[u % len(widths)], scale=0.05) for u in range(U)]


@pytest.mark.parametrize("H,widths,threads", [(256, [128], 1), (768, [512], 2), (80, [48, 96], 1)])
@pytest.mark.parametrize("residual", [False, True])
def test_experts_rows_equal_each_row_alone(H, widths, threads, residual):
    """Rows that share experts, rows that share none, a row that picks one expert; each expert read once."""
    U = 7
    w13, w2 = experts(U, H, widths)
    picks = [[0, 2, 5, 6], [1, 2, 3, 4], [0, 6], [3], [4, 5, 6, 1]]
    weights = [torch.rand(len(p), generator=G).tolist() for p in picks]
    x = rand(len(picks), H)
    res = rand(len(picks), H) if residual else None
    n = torch.get_num_threads()
    torch.set_num_threads(threads)  # the task split follows the threads; the sums must not
    try:
        got = bf16_rows.experts_rows(x, w13, w2, picks, weights, res)
        want = torch.cat([cpu_bf16.experts_one_token(x[b : b + 1], [w13[u] for u in p], [w2[u] for u in p], weights[b],
                                                     None if res is None else res[b : b + 1])
                          for b, p in enumerate(picks)])
    finally:
        torch.set_num_threads(n)
    assert same_bytes(got, want)


def test_experts_rows_check_their_inputs():
    w13, w2 = experts(2, 64, [32])
    m = bf16_rows.module()
    with pytest.raises(RuntimeError, match="picks expert 2 of 2"):
        m.experts_rows(rand(1, 64), w13, w2, [[0, 2]], [[0.5, 0.5]])
    with pytest.raises(RuntimeError, match="one weight per pick"):
        m.experts_rows(rand(1, 64), w13, w2, [[0, 1]], [[0.5]])
    with pytest.raises(RuntimeError, match="expert shapes"):
        m.experts_rows(rand(1, 64), w13, [w2[0], rand(64, 16)], [[0, 1]], [[0.5, 0.5]])


def attention_inputs(B, H, N, G, D, S, qk_norm, bias, E):
    """attention_decode's arguments for B rows, each with its own KV cache (filled with earlier positions) and
    position."""
    w = dict(wq=rand(N * D, H, scale=0.05), wk=rand(G * D, H, scale=0.05), wv=rand(G * D, H, scale=0.05),
             wo=rand(H, N * D, scale=0.05))
    bq, bk, bv, bo = (rand(n) if bias else None for n in (N * D, G * D, G * D, H))
    size = D if qk_norm == 1 else None
    q_norm = rand(size or N * D, scale=0.5) + 1 if qk_norm else None
    k_norm = rand(size or G * D, scale=0.5) + 1 if qk_norm else None
    pos = [3, 0, S - 1, 17][:B]
    caches = [(rand(G, S, D), rand(G, S, D)) for _ in range(B)]
    cos = [rand(D) for _ in range(B)]
    sin = [rand(D) for _ in range(B)]
    router = rand(E, H, scale=0.1) if E else None
    return dict(h=rand(B, H), attn_norm=rand(H) + 1, ffn_norm=rand(H) + 1, **w, bq=bq, bk=bk, bv=bv, bo=bo,
                q_norm=q_norm, k_norm=k_norm, pos=pos, caches=caches, cos=cos, sin=sin, router=router)


@pytest.mark.parametrize("qk_norm,bias,E,top_k", [(0, False, 0, 0), (1, True, 16, 4), (2, False, 8, 0),
                                                  (1, False, 64, 8)])
def test_attention_rows_equal_attention_decode_per_row(qk_norm, bias, E, top_k):
    """Each row's residual, FFN input, router logits, experts, weights and KV cache writes, byte for byte."""
    B, H, N, G, D, S = 4, 256, 8, 2, 64, 40
    a = attention_inputs(B, H, N, G, D, S, qk_norm, bias, E)
    one = native.load("bf16_decode")
    mine = [(k.clone(), v.clone()) for k, v in a["caches"]]
    got = bf16_rows.module().attention_rows(
        a["h"], a["attn_norm"], a["ffn_norm"], 1e-6, a["wq"], a["wk"], a["wv"], a["wo"], a["bq"], a["bk"], a["bv"],
        a["bo"], qk_norm, a["q_norm"], a["k_norm"], a["cos"], a["sin"], [k for k, _ in mine], [v for _, v in mine],
        a["pos"], D**-0.5, a["router"], top_k, True, False)
    for b in range(B):
        k, v = a["caches"][b]
        want = one.attention_decode(
            a["h"][b : b + 1], a["attn_norm"], a["ffn_norm"], 1e-6, a["wq"], a["wk"], a["wv"], a["wo"], a["bq"],
            a["bk"], a["bv"], a["bo"], qk_norm, a["q_norm"], a["k_norm"], a["cos"][b], a["sin"][b], k, v,
            a["pos"][b], D**-0.5, a["router"], top_k, True, False)
        for g, w in zip(got[b], want):
            if isinstance(w, torch.Tensor):
                assert w.dtype != torch.bfloat16 or same_bytes(g, w)
                assert torch.equal(g, w)
            else:
                assert g == w
        assert same_bytes(mine[b][0], k) and same_bytes(mine[b][1], v)


def test_attention_rows_check_positions():
    a = attention_inputs(2, 64, 2, 1, 32, 8, 0, False, 0)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        bf16_rows.module().attention_rows(
            a["h"], a["attn_norm"], a["ffn_norm"], 1e-6, a["wq"], a["wk"], a["wv"], a["wo"], None, None, None, None,
            0, None, None, a["cos"], a["sin"], [k for k, _ in a["caches"]], [v for _, v in a["caches"]], [3, 8],
            0.1, None, 0, False, False)


def test_the_haswell_build_passes_these_tests():
    """This file with every kernel built for haswell (AVX2 + FMA: the portable core) and moepage's own thread pool
    (~1-2 minutes to compile the modules the first time per environment; cached after)."""
    if os.environ.get("MOEPAGE_KERNEL_ARCH") == "haswell":
        pytest.skip("this is the haswell run")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    env = dict(os.environ, MOEPAGE_KERNEL_ARCH="haswell", MOEPAGE_KERNEL_OPENMP="0")
    env.pop("MOEPAGE_KERNELS", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "not haswell_build"], capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
