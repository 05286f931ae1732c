"""Prompt-sized products on GGML weights with ggml's own kernels (csrc/ggml_gemm.cpp): the activations converted
once per row to the weight's vec_dot type, then every weight tile multiplied by all rows while it is in cache
(interleaved Q4_K 4 rows x 8 weight rows a pass through ggml's gemm; other types vec_dot per pair). Each output is
the product of one weight row with one converted activation row by the kernel a one-token decode uses, so a row's
result is the same bits whatever else is in the call (batch shape, chunking, threads).

`backend()` is None where ggml's CPU library (kernels/ggml_cpu.py) or this module's build is unavailable; callers
then use ggml_linear's row-by-row path.

Shape legend: T tokens, H hidden, I expert intermediate size, R experts per token, N weight rows, K weight columns.
"""
from __future__ import annotations

import threading

import torch

from moepage.kernels import native
from moepage.kernels.ggml import QuantizedTensor, backend_for

_lock = threading.Lock()
_module: list = []  # [module | None] once decided


def backend():
    """The opened module (the same library ggml_cpu uses), or None."""
    if _module:
        return _module[0]
    with _lock:
        if not _module:
            from moepage.kernels.ggml_cpu import backend as ggml_cpu_backend

            b = ggml_cpu_backend()
            module = native.load("ggml_gemm") if b is not None else None
            if module is not None:
                try:
                    module.open(b.path)
                except RuntimeError:
                    module = None
            _module.append(module)
        return _module[0]


def linear(x: torch.Tensor, w: QuantizedTensor) -> torch.Tensor | None:
    """x [T, K] @ w [N, K]^T -> [T, N] in x's dtype, or None where these kernels do not apply."""
    m = backend()
    b = backend_for(w) if m is not None and x.dim() == 2 and x.device.type == "cpu" else None
    if b is None or len(w.shape) != 2 or x.shape[-1] % b.activation_block(w.type.id):
        return None
    return m.linear(x, w.data, w.kernel_type, w.shape[0]).to(x.dtype)


def fusable(experts: list) -> tuple[int, int, int] | None:
    """The (gate, up, down) kernel types when every expert in the list is quantized with the same types and shapes
    and ggml multiplies them here, else None."""
    if backend() is None or not experts or not all(hasattr(ex, "down") and hasattr(ex, "gate") for ex in experts):
        return None
    g0, u0, d0 = experts[0].gate, experts[0].up, experts[0].down
    if any(backend_for(t) is None for t in (g0, u0, d0)) or g0.type.name == "F32" or d0.type.name == "F32":
        return None
    types = (g0.kernel_type, u0.kernel_type, d0.kernel_type)
    b = backend_for(g0)
    H, I = g0.shape[1], g0.shape[0]
    if H % b.activation_block(g0.type.id) or H % b.activation_block(u0.type.id) or I % b.activation_block(d0.type.id):
        return None
    for ex in experts:
        if (ex.gate.kernel_type, ex.up.kernel_type, ex.down.kernel_type) != types or ex.gate.shape != g0.shape \
                or ex.up.shape != u0.shape or ex.down.shape != d0.shape:
            return None
    return types


def experts_accumulate(acc: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                       ids: list[int], experts: list, types: tuple[int, int, int]) -> None:
    """acc [T, H] float32 += each token's experts among ids (ascending), weighted, summed in ascending expert order.
    x [T, H]; indices [T, R] and weights [T, R] the router's choice; experts: QuantizedExpert per id."""
    m = backend()
    I = experts[0].gate.shape[0]
    m.experts_accumulate(acc, x, indices.long(), weights.float(), ids, [e.gate.data for e in experts],
                         [e.up.data for e in experts], [e.down.data for e in experts], *types, I)
