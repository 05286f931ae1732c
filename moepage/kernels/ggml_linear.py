"""Matmuls against GGML weights with llama.cpp's numerics, and a weight tensor that stays quantized.

llama.cpp never multiplies a quantized (or F16) weight by float32 activations: it first converts the activations
to the weight type's "vec_dot type" (F16 for F16 weights, Q8_0 blocks of 32 for Q4_0..Q8_0, Q8_K blocks of 256
for K-quants) and multiplies those. `ggml_activations` reproduces that rounding (opt-in, see EMULATE).

Shape legend: T tokens, K input features (weight columns), N output features (weight rows), V vocab rows.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moepage.kernels.ggml import QuantizedTensor, native_ggml

Q8_0_ACTIVATIONS = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
Q8_K_ACTIVATIONS = {"Q4_K", "Q5_K", "Q6_K"}
# Opt-in (MOEPAGE_GGML_ACTIVATIONS=ggml): measured on a tiny Qwen3-MoE it moves moepage's logits by as much as
# they differ from llama.cpp's (~0.07 for Q8_0) without shrinking that gap, so the default multiplies float
# activations (the exact product of the stored weights).
EMULATE = os.environ.get("MOEPAGE_GGML_ACTIVATIONS", "float") == "ggml"


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> values of quantize_row_q8_0 (x86): d = amax/127 stored as f16, q = round-half-even(x*127/amax)."""
    b = x.reshape(-1, 32)
    amax = b.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv)
    d = (amax / 127.0).half().float()
    return (q * d).reshape(x.shape)


def _q8_k(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> values of quantize_row_q8_K: iscale = -127/max (max: the signed value of largest |x|),
    q = min(127, nearest(iscale*x)), d = 1/iscale (float32)."""
    b = x.reshape(-1, 256)
    mx = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))  # [n, 1]
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.round(iscale * b).clamp(max=127)
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return (q * d).reshape(x.shape)


def ggml_activations(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """x [..., K] float -> the activations llama.cpp would multiply a `weight_type` weight with."""
    if not EMULATE or x.dtype != torch.float32:
        return x
    if weight_type == "F16":
        return x.half().float()
    if weight_type == "BF16":
        return x.bfloat16().float()
    if weight_type in Q8_0_ACTIVATIONS and x.shape[-1] % 32 == 0:
        return _q8_0(x)
    if weight_type in Q8_K_ACTIVATIONS and x.shape[-1] % 256 == 0:
        return _q8_k(x)
    return x


GEMV_ROWS = 8  # up to this many tokens, blocks are decoded inside the matmul; more: dequantize, then GEMM


def ggml_linear(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w [N, K]^T (+ bias) -> [T, N]: blocks decoded inside the matmul for a few tokens (C++),
    otherwise w dequantized just in time."""
    fast = native_ggml(w) if not EMULATE and x.dim() == 2 and x.shape[0] <= GEMV_ROWS else None
    if fast is not None and x.device.type == "cpu":
        out = fast.linear(x, w.data, w.type.name, w.shape[0])
        return out if bias is None else out + bias
    return F.linear(ggml_activations(x, w.type.name), w.dequantize(x.dtype), bias)


def ggml_embedding(ids: torch.Tensor, w: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """ids [T] -> rows [T, K] of w [V, K], only those rows dequantized."""
    rows, cols = w.shape
    per_row = w.type.row_bytes(cols)
    picked = w.data.view(rows, per_row)[ids.reshape(-1)]  # [T, row bytes]
    out = QuantizedTensor(picked.reshape(-1), w.type, (picked.shape[0], cols), w.name).dequantize(dtype)
    return out.view(*ids.shape, cols)


_METADATA_OPS = {
    torch.Tensor.numel, torch.Tensor.element_size, torch.Tensor.dim, torch.Tensor.size, torch.Tensor.__repr__,
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
    torch.Tensor.is_floating_point, torch.Tensor.nbytes.__get__,
}


class GGMLWeight(torch.Tensor):
    """A resident weight kept as its GGML bytes (uint8 [R, row bytes]: numel x element_size is the stored size).

    Works wherever the model uses it through F.linear or F.embedding (dequantizing just in time, with llama.cpp's
    activation rounding); any other tensor op raises instead of silently computing on bytes.
    """

    qweight: QuantizedTensor
    compute_dtype: torch.dtype

    @staticmethod
    def __new__(cls, q: QuantizedTensor, compute_dtype: torch.dtype):
        rows = q.shape[0] if len(q.shape) > 1 else 1
        data = q.data.view(rows, -1)
        t = torch.Tensor._make_subclass(cls, data, False)
        t.qweight = q
        t.compute_dtype = compute_dtype
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return ggml_linear(x, w.qweight, bias)
        if func is F.embedding:
            ids, w = args[0], args[1]
            return ggml_embedding(ids, w.qweight, w.compute_dtype)
        if func in _METADATA_OPS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        raise TypeError(f"GGML weight {args[0].qweight.name if isinstance(args[0], GGMLWeight) else ''!s}: "
                        f"{getattr(func, '__name__', func)} is not supported on a quantized weight; "
                        f"use .qweight.dequantize()")
