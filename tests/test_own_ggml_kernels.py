"""moepage's AVX-512 Q6_K dot product and interleaved Q4_K gemv and gemm (csrc/ggml_q6k_avx512.h, ggml_q4k_avx512.h,
ggml_q4k_gemm_avx512.h) give the bits of the library's AVX2 kernels they stand in for, on any bytes and shapes, one
or many threads; they are compiled in wherever the kernels' build target has AVX512BW and the library's kernels are
its AVX2 ones."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ggml_support import GGML, random_weight
from moepage.kernels import ggml_gemm
from moepage.kernels.cpu import build_target, cpu_features, target_features

Q6_K, Q4_K, INTERLEAVED = 14, 12, 256

pytestmark = pytest.mark.skipif(GGML is None, reason="the ggml CPU kernels are not available here")


def _target_has_avx512bw() -> bool:
    features = target_features(build_target())
    return features is not None and "avx512bw" in features


def _own(on: bool, fn, module=None):
    module = module or GGML.module
    was = module.use_own_kernels(on)
    try:
        return fn()
    finally:
        module.use_own_kernels(was)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_they_are_used_wherever_the_build_target_and_the_library_allow():
    expected = [Q6_K, Q4_K | INTERLEAVED] if _target_has_avx512bw() and "avx2" in GGML.features else []
    assert sorted(GGML.module.own_kernel_types()) == sorted(expected)
    assert _own(False, GGML.module.own_kernel_types) == []
    gemm = ggml_gemm.backend()
    if gemm is not None:
        assert gemm.own_gemm() == (Q4_K | INTERLEAVED in expected and gemm.has_gemm())
        assert not _own(False, gemm.own_gemm, gemm)


needs_own = pytest.mark.skipif(not GGML.module.own_kernel_types() if GGML else True,
                               reason="no kernel of ours stands in here (the build target lacks AVX512BW, or the "
                                      "library's kernels are not its AVX2 ones)")


def _activations(rows: int, cols: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, : min(cols, 7)] = 1e4  # Q8_K blocks with values at the ends of the int8 range
    return x


@needs_own
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), blocks=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), m=st.integers(1, 3))
def test_q6_k_dot_products_are_the_librarys_bits(rows, blocks, seed, m):
    cols = 256 * blocks
    raw = random_weight("Q6_K", rows, cols, seed)[0].data
    x = _activations(m, cols, seed)
    ref = _own(False, lambda: GGML.linear(x, raw, Q6_K, rows))
    got = _own(True, lambda: GGML.linear(x, raw, Q6_K, rows))
    assert torch.equal(_bits(got), _bits(ref))


@needs_own
@settings(max_examples=25, deadline=None)
@given(groups=st.integers(1, 7), blocks=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), m=st.integers(1, 3))
def test_interleaved_q4_k_products_are_the_librarys_bits(groups, blocks, seed, m):
    rows, cols = 8 * groups, 256 * blocks
    raw = random_weight("Q4_K", rows, cols, seed)[0].data.clone()
    GGML.relayout_(raw, Q4_K, rows, cols, True)
    x = _activations(m, cols, seed)
    ref = _own(False, lambda: GGML.linear(x, raw, Q4_K | INTERLEAVED, rows))
    got = _own(True, lambda: GGML.linear(x, raw, Q4_K | INTERLEAVED, rows))
    assert torch.equal(_bits(got), _bits(ref))


needs_own_gemm = pytest.mark.skipif(not (ggml_gemm.backend() is not None and ggml_gemm.backend().own_gemm()),
                                    reason="the interleaved Q4_K gemm here is the library's")


@needs_own_gemm
@settings(max_examples=25, deadline=None)
@given(groups=st.integers(1, 7), blocks=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), m=st.integers(1, 37))
def test_interleaved_q4_k_gemm_is_the_librarys_bits(groups, blocks, seed, m):
    """Prompt-sized products (4-row groups, 16-row tiles and their remainders, an odd last 8-row group through the
    library) equal the library's gemm bit for bit; Q6_K rows too (the dot product of ggml_q6k_avx512.h)."""
    rows, cols = 8 * groups, 256 * blocks
    raw = random_weight("Q4_K", rows, cols, seed)[0].data.clone()
    GGML.relayout_(raw, Q4_K, rows, cols, True)
    x = _activations(m, cols, seed)
    gemm = ggml_gemm.backend()
    ref = _own(False, lambda: gemm.linear(x, raw, Q4_K | INTERLEAVED, rows), gemm)
    got = _own(True, lambda: gemm.linear(x, raw, Q4_K | INTERLEAVED, rows), gemm)
    assert torch.equal(_bits(got), _bits(ref))
    six = random_weight("Q6_K", rows, cols, seed)[0].data
    assert torch.equal(_bits(_own(True, lambda: gemm.linear(x, six, Q6_K, rows), gemm)),
                       _bits(_own(False, lambda: gemm.linear(x, six, Q6_K, rows), gemm)))


@needs_own
@pytest.mark.parametrize("qtype", ["Q6_K", "Q4_K"])
def test_large_matrices_on_every_thread_count_are_the_librarys_bits(qtype):
    rows, cols = 4096, 1024  # many tasks, so the prefetch runs past task and matrix ends
    raw = random_weight(qtype, rows, cols, 11)[0].data.clone()
    type_id = Q6_K if qtype == "Q6_K" else Q4_K | INTERLEAVED
    if qtype == "Q4_K":
        GGML.relayout_(raw, Q4_K, rows, cols, True)
    x = _activations(2, cols, 12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = _own(False, lambda: GGML.linear(x, raw, type_id, rows))
        for n in {1, 2, max(2, before)}:
            torch.set_num_threads(n)
            assert torch.equal(_bits(_own(True, lambda: GGML.linear(x, raw, type_id, rows))), _bits(ref))
    finally:
        torch.set_num_threads(before)


def test_a_cpu_with_avx512bw_builds_them_by_default(monkeypatch):
    if "avx512bw" not in cpu_features():
        pytest.skip("this CPU has no AVX512BW")
    monkeypatch.delenv("MOEPAGE_KERNEL_ARCH", raising=False)
    assert _target_has_avx512bw()


@needs_own_gemm
def test_large_gemm_on_every_thread_count_is_the_librarys_bits():
    rows, cols = 2056, 1024  # tiles split between threads anywhere, an odd 8-row group at the end
    raw = random_weight("Q4_K", rows, cols, 13)[0].data.clone()
    GGML.relayout_(raw, Q4_K, rows, cols, True)
    x = _activations(38, cols, 14)
    gemm = ggml_gemm.backend()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = _own(False, lambda: gemm.linear(x, raw, Q4_K | INTERLEAVED, rows), gemm)
        for n in {1, 2, max(2, before)}:
            torch.set_num_threads(n)
            got = _own(True, lambda: gemm.linear(x, raw, Q4_K | INTERLEAVED, rows), gemm)
            assert torch.equal(_bits(got), _bits(ref))
    finally:
        torch.set_num_threads(before)
