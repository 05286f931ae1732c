"""bf16 decode kernels for CPUs with AVX512-BF16, compiled once on first use (torch.utils.cpp_extension).

torch's bf16 F.linear with one activation row runs at ~12 GB/s on the 2-core machines we measure on, a third of
what the memory system gives; a decode step is almost only such matrix-vector products. `linear` and
`experts_one_token` read each weight once at close to memory bandwidth. Where the CPU lacks AVX512-BF16, the
compiler is missing, or MOEPAGE_KERNELS=torch is set, `available()` is False and callers use plain torch.

Shape legend: M tokens (at most MAX_ROWS), K input features, N output features, H hidden, I expert FFN width.
"""
from __future__ import annotations

import logging
import os
import threading

import torch
import torch.nn.functional as F

MAX_ROWS = 8  # above this, torch's GEMM (oneDNN) is the better kernel
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "bf16_decode.cpp")
_lock = threading.Lock()
_module = None
_tried = False
log = logging.getLogger("moepage.kernels")


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        pass
    return False


def _load():
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("MOEPAGE_KERNELS", "auto") == "torch" or not _cpu_has_avx512_bf16():
            return None
        try:
            from torch.utils.cpp_extension import load

            log.info("compiling moepage's bf16 CPU kernels (once; cached under ~/.cache/torch_extensions)")
            _module = load(
                name="moepage_bf16_decode_v1", sources=[_SOURCE], verbose=False,
                extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
            )
        except Exception as e:  # no compiler, no ninja, an old assembler: torch kernels instead
            log.warning("bf16 CPU kernels unavailable (%s); using torch's", str(e).splitlines()[0] if str(e) else e)
            _module = None
        return _module


def available() -> bool:
    return _load() is not None


def _fast(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and type(w) is torch.Tensor and w.dtype == torch.bfloat16
            and x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= MAX_ROWS and w.dim() == 2
            and w.is_contiguous() and available())


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T (+ bias) -> [M, N]; the bf16 kernel for a few rows, F.linear otherwise."""
    if _fast(x, w):
        return _module.linear(x.contiguous(), w, bias)
    return F.linear(x, w, bias)


def experts_one_token(x: torch.Tensor, w13: list[torch.Tensor], w2: list[torch.Tensor],
                      weights: torch.Tensor) -> torch.Tensor | None:
    """x [1, H] through experts (w13 [2I, H], w2 [H, I]) weighted by weights [E], summed in list order;
    None when the fused kernel does not apply (caller computes expert by expert)."""
    if not (_fast(x, w13[0]) and x.shape[0] == 1 and all(type(w) is torch.Tensor and w.is_contiguous() for w in w13 + w2)):
        return None
    return _module.experts_one_token(x.contiguous(), w13, w2, weights)
