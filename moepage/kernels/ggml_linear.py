"""Matmuls against GGML weights with llama.cpp's numerics, and a weight tensor that stays quantized.

llama.cpp never multiplies a quantized (or F16) weight by float32 activations: it first converts the activations
to the weight type's "vec_dot type" (F16 for F16 weights, Q8_0 blocks of 32 for Q4_0..Q8_0, Q8_K blocks of 256
for K-quants) and multiplies those. moepage calls ggml's own conversion and dot products (kernels/ggml_cpu.py).

Shape legend: T tokens, K input features (weight columns), N output features (weight rows), V vocab rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moepage.kernels.ggml import QuantizedTensor, backend_for, is_quantized

Q8_0, Q8_1 = 8, 9  # GGML type ids
GEMV_ROWS = 8  # up to this many tokens, one ggml vec_dot per weight row; more: dequantize, then torch's GEMM


def rounded_activations(b, x: torch.Tensor, w: QuantizedTensor) -> torch.Tensor:
    """x [T, K] -> float32 values of the activations ggml multiplies a w-typed weight with (ggml's own from_float
    into the weight's vec_dot type, decoded back)."""
    _, _, dot_type, _ = b.type_info(w.type.id)
    if dot_type == 0:  # F32
        return x.float()
    kind = w.type.id
    if dot_type == Q8_1:  # Q4_1/Q5_1: ggml cannot decode Q8_1, whose values round exactly as Q8_0's (Q8_0's own dot type)
        kind = dot_type = Q8_0
    q = b.quantize_rows(x.reshape(-1, x.shape[-1]), kind)
    return b.dequantize(q.reshape(-1), dot_type, q.shape[0], x.shape[-1]).view(x.shape)


def ggml_linear(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w [N, K]^T (+ bias) -> [T, N] in x's dtype, with llama.cpp's numerics where ggml's library is
    present: a few tokens through ggml's vec_dot on the stored bytes; more through torch's GEMM on the dequantized
    weight and (block types) the activations ggml would use. Without it: the weight dequantized with torch, float
    activations."""
    b = backend_for(w) if x.dim() == 2 and x.device.type == "cpu" else None
    if b is None or x.shape[-1] % b.activation_block(w.type.id):
        return F.linear(x, w.dequantize(x.dtype), bias)
    if x.shape[0] <= GEMV_ROWS:
        out = b.linear(x, w.data, w.kernel_type, w.shape[0])
        return out if bias is None else out + bias
    if not is_quantized(w.type):  # 16-bit weights: the exact product, as the same checkpoint in safetensors gives
        return F.linear(x, w.dequantize(x.dtype), bias)
    from moepage.kernels.ggml_gemm import linear as gemm  # the same per-row products, tiled over many rows

    if (out := gemm(x, w)) is not None:
        return out if bias is None else out + bias
    return F.linear(rounded_activations(b, x, w).to(x.dtype), w.dequantize(x.dtype), bias)


def ggml_embedding(ids: torch.Tensor, w: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """ids [T] -> rows [T, K] of w [V, K], only those rows dequantized."""
    rows, cols = w.shape
    if w.interleaved:
        raise ValueError(f"tensor {w.name!r}: an embedding's rows are read one by one; it is never interleaved")
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
