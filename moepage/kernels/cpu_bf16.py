"""bf16 decode kernels, compiled once on first use for the machine (torch.utils.cpp_extension, kernels/native.py).

torch's bf16 F.linear with one activation row runs at ~12 GB/s on the 2-core machines we measure on, a third of
what the memory system gives; a decode step is almost only such matrix-vector products. `linear` and
`experts_one_token` read each weight once at close to memory bandwidth (C++ in csrc/bf16_decode.cpp: vdpbf16ps where
the build target has AVX512-BF16, else the portable core of csrc/bf16_portable.h, which compiles to AVX2 + FMA, NEON
or plain SSE2); without a compiler `available()` is False and plain torch runs.

Shape legend: M tokens (at most MAX_ROWS), K input features, N output features, H hidden, I expert FFN width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moepage.kernels import native

MAX_ROWS = 8  # above this, torch's GEMM (oneDNN) is the better kernel


def available() -> bool:
    return native.load("bf16_decode") is not None


def _fast(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and type(w) is torch.Tensor and w.dtype == torch.bfloat16
            and x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= MAX_ROWS and w.dim() == 2
            and w.is_contiguous() and available())


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T (+ bias) -> [M, N]; the bf16 kernel for a few rows, F.linear otherwise."""
    if _fast(x, w):
        return native.load("bf16_decode").linear(x.contiguous(), w, bias)
    return F.linear(x, w, bias)


def experts_one_token(x: torch.Tensor, w13: list[torch.Tensor], w2: list[torch.Tensor],
                      weights: list[float], residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [1, H] through experts (w13 [2I, H], w2 [H, I]) weighted by weights (floats), summed in list order
    (+ residual [1, H]); None when the fused kernel does not apply (caller computes expert by expert)."""
    if not (_fast(x, w13[0]) and x.shape[0] == 1):
        return None
    return native.load("bf16_decode").experts_one_token(x.contiguous(), w13, w2, weights, residual)
