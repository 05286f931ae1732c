"""Row-invariant multi-row kernels for a batched decode step (csrc/bf16_rows.cpp, compiled on first use like the other
kernels): the lm_head (bf16 or the 12-bit PackedMatrix) and a layer's routed experts for B sequences in one call,
each weight row read once for all of them, each sequence's result bit for bit what the one-row kernels give it alone
(tests/test_bf16_rows.py). Each function returns None where the one-row path would not take the bf16 kernels
(plain torch, another dtype or device): the caller then runs the rows one at a time, as before.

Shape legend: B sequences, K input features, N output features, H hidden, I expert FFN width.
"""
from __future__ import annotations

import torch

from moepage.kernels import cpu_bf16, native
from moepage.paging.bf16_12bit import PackedMatrix


def module():
    """The compiled bf16_rows module where it and the one-row bf16_decode module both run, else None."""
    if not cpu_bf16.available():
        return None
    return native.load("bf16_rows")


def _rows_ok(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2 and x.shape[0] >= 1


def lm_head_rows(x: torch.Tensor, head) -> torch.Tensor | None:
    """x [B, K] @ head^T -> [B, N] (head a bf16 [N, K] tensor or a PackedMatrix); row b equals what
    model.forward's lm_head product gives x[b:b+1] alone; None where that product is not a bf16 kernel's."""
    m = module()
    if m is None or not _rows_ok(x):
        return None
    x = x.contiguous()
    if isinstance(head, PackedMatrix):
        # alone: linear_12bit where it is built, else blocks decoded into the bf16 linear(): the one-row sums either way
        return m.linear_rows_12bit(x, head.lo, head.codes, head.exc, head.row_exc, head.luts, head.ROWS)
    if not cpu_bf16._fast(x[:1], head):
        return None
    return m.linear_rows(x, head)


def experts_rows(x: torch.Tensor, w13: list[torch.Tensor], w2: list[torch.Tensor], picks: list[list[int]],
                 weights: list[list[float]], residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [B, H]; w13[u] [2I, H], w2[u] [H, I] the step's distinct experts; row b sums experts picks[b] (indices into
    w13/w2, in that order) weighted by weights[b] (+ residual [B, H]) -> [B, H], row b bit for bit
    cpu_bf16.experts_one_token of that row alone; None where that kernel would not run."""
    m = module()
    if m is None or not w13 or not _rows_ok(x) or not cpu_bf16._fast(x[:1], w13[0]):
        return None
    if not all(cpu_bf16._fast(x[:1], w) for w in (*w13, *w2)):
        return None
    return m.experts_rows(x.contiguous(), w13, w2, picks, weights, residual)


def attention_kernel(model):
    """The module whose attention_rows runs B rows through a layer's attention half as model._decode_kernel's
    attention_decode runs one (that attention_decode must be bf16_decode's, not the GGML twin's), else None."""
    m = module()
    one = getattr(model._decode_kernel, "attention_decode", None)
    return m if m is not None and one is not None and one is native.load("bf16_decode").attention_decode else None
