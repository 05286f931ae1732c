"""ggml's 8-row interleaved Q4_K layout (csrc/ggml_cpu_interleave.h; llama.cpp's CPU backend repacks Q4_K matrices
into it on AVX2 and NEON with int8 matmul): the rearrangement is lossless, dequantizes to the same values, and the
interleaved kernel (ggml_gemv_q4_K_8x8_q8_K) gives the row-by-row vec_dot's products within float32 summation
order (its thread and batch independence and the fused experts over it: test_quant_matvec.py)."""
from __future__ import annotations

import pytest
import torch

from ggml_support import GGML, interleaved, interleaves_q4_k, random_weight
from moepage.kernels.ggml import QuantizedTensor, interleaved_for_matvec
from moepage.kernels.ggml_linear import ggml_linear

pytestmark = pytest.mark.skipif(not interleaves_q4_k(),
                                reason="ggml's CPU library has no interleaved Q4_K kernel for this CPU (it needs "
                                       "AVX2, or NEON with int8 matmul)")


def test_layout_round_trip_is_lossless_for_any_bytes():
    raw = torch.randint(0, 256, (24 * 3 * 144,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    moved = raw.clone()
    GGML.relayout_(moved, 12, 24, 768, True)
    assert not torch.equal(moved, raw)
    GGML.relayout_(moved, 12, 24, 768, False)
    assert torch.equal(moved, raw)


def test_interleaved_dequantizes_to_the_same_values():
    w, _ = random_weight("Q4_K", 40, 512, seed=2)
    wi = interleaved(w)
    assert wi.interleaved and not torch.equal(wi.data, w.data)
    assert torch.equal(wi.dequantize(), w.dequantize())


@pytest.mark.parametrize("rows", [1, 3])
def test_interleaved_products_equal_row_by_row_within_summation_order(rows):
    w, _ = random_weight("Q4_K", 64, 1024, seed=3)
    x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(4))
    plain, got = ggml_linear(x, w), ggml_linear(x, interleaved(w))
    assert torch.allclose(got, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    assert not torch.equal(got, plain)  # a different kernel really ran


def test_only_q4_k_matrices_of_whole_8_row_groups_are_interleaved():
    assert not interleaved(random_weight("Q4_K", 36, 256, seed=8)[0]).interleaved  # 36 rows: not 8-row groups
    assert not interleaved(random_weight("Q6_K", 64, 256, seed=8)[0]).interleaved  # no faster kernel used here
    q = interleaved(random_weight("Q4_K", 64, 256, seed=8)[0])
    assert interleaved_for_matvec(q) is q  # never twice
    with pytest.raises(ValueError, match="embedding"):
        torch.nn.functional.embedding(torch.tensor([1]), _weight(q))


def _weight(q: QuantizedTensor):
    from moepage.kernels.ggml_linear import GGMLWeight

    return GGMLWeight(q, torch.float32)
