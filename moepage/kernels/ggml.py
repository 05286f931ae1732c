"""GGML tensor types: block layouts and torch dequantization, bit-exact with `gguf.quants.dequantize`.

A GGML tensor of logical shape [R, C] (C = the innermost GGUF dimension ne[0]) is stored row by row, each row
C / B blocks of S bytes (B values per block, S bytes per block). `dequantize` takes those bytes as uint8 and
returns the float values; the arithmetic follows ggml-quants.c's order of float32 operations, so the result
is identical, bit for bit, to gguf-py's numpy reference.

Shape legend: N blocks, B values per block, S bytes per block, R rows, C columns (values per row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int
    block_size: int  # B: values per block
    type_size: int  # S: bytes per block

    def row_bytes(self, columns: int) -> int:
        return columns // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        rows = 1
        for s in shape[:-1]:
            rows *= s
        return rows * self.row_bytes(shape[-1])


# Ids and layouts from ggml.h / gguf-py constants (GGMLQuantizationType, GGML_QUANT_SIZES).
TYPES: dict[int, GGMLType] = {t.id: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("Q4_0", 2, 32, 18), GGMLType("Q4_1", 3, 32, 20),
    GGMLType("Q5_0", 6, 32, 22), GGMLType("Q5_1", 7, 32, 24), GGMLType("Q8_0", 8, 32, 34), GGMLType("Q8_1", 9, 32, 40),
    GGMLType("Q2_K", 10, 256, 84), GGMLType("Q3_K", 11, 256, 110), GGMLType("Q4_K", 12, 256, 144),
    GGMLType("Q5_K", 13, 256, 176), GGMLType("Q6_K", 14, 256, 210), GGMLType("Q8_K", 15, 256, 292),
    GGMLType("IQ2_XXS", 16, 256, 66), GGMLType("IQ2_XS", 17, 256, 74), GGMLType("IQ3_XXS", 18, 256, 98),
    GGMLType("IQ1_S", 19, 256, 50), GGMLType("IQ4_NL", 20, 32, 18), GGMLType("IQ3_S", 21, 256, 110),
    GGMLType("IQ2_S", 22, 256, 82), GGMLType("IQ4_XS", 23, 256, 136), GGMLType("I8", 24, 1, 1),
    GGMLType("I16", 25, 1, 2), GGMLType("I32", 26, 1, 4), GGMLType("I64", 27, 1, 8), GGMLType("F64", 28, 1, 8),
    GGMLType("IQ1_M", 29, 256, 56), GGMLType("BF16", 30, 1, 2), GGMLType("TQ1_0", 34, 256, 54),
    GGMLType("TQ2_0", 35, 256, 66), GGMLType("MXFP4", 39, 32, 17),
)}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in TYPES.values()}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class UnsupportedQuantType(ValueError):
    """A tensor uses a GGML type moepage cannot dequantize (yet)."""


def ggml_type(type_id: int | str, tensor: str = "?") -> GGMLType:
    t = BY_NAME.get(type_id) if isinstance(type_id, str) else TYPES.get(int(type_id))
    if t is None:
        raise UnsupportedQuantType(f"unknown GGML type id {type_id} in tensor {tensor!r}")
    return t


# ---- helpers ----------------------------------------------------------------------------------------
def _f16(b: torch.Tensor) -> torch.Tensor:
    """b [N, 2] uint8 (little-endian half) -> [N, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """qs [N, ..., group] bytes -> [N, ..., 2, group]: low nibbles first, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(x: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """x [..., n] -> [..., len(shifts), n] of (x >> shift) & mask."""
    s = torch.tensor(shifts, dtype=x.dtype).view(-1, 1)
    return (x.unsqueeze(-2) >> s) & mask


def _u32(b: torch.Tensor) -> torch.Tensor:
    """b [N, 4] uint8 -> [N, 1] int64 holding the little-endian uint32."""
    b = b.long()
    return (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)).view(-1, 1)


# ---- 32-value block types ---------------------------------------------------------------------------
def _q4_0(blk: torch.Tensor) -> torch.Tensor:
    """blk [N, 18]: f16 d, 16 bytes of nibbles -> [N, 32] = d * (q - 8)."""
    d = _f16(blk[:, :2])
    q = _nibbles(blk[:, 2:], 16).reshape(-1, 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(blk: torch.Tensor) -> torch.Tensor:
    """blk [N, 20]: f16 d, f16 m, 16 bytes of nibbles -> [N, 32] = d * q + m."""
    d, m = _f16(blk[:, :2]), _f16(blk[:, 2:4])
    q = _nibbles(blk[:, 4:], 16).reshape(-1, 32).float()
    return d * q + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """qh [N, 4] -> [N, 32] uint8 fifth bits (bit j of the little-endian uint32 for value j)."""
    bits = (_u32(qh) >> torch.arange(32)) & 1
    return bits.to(torch.uint8)


def _q5_0(blk: torch.Tensor) -> torch.Tensor:
    """blk [N, 22]: f16 d, u32 high bits, 16 bytes of nibbles -> [N, 32] = d * (q - 16)."""
    d = _f16(blk[:, :2])
    low = _nibbles(blk[:, 6:], 16).reshape(-1, 32)
    q = (low | (_q5_high(blk[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _q5_1(blk: torch.Tensor) -> torch.Tensor:
    """blk [N, 24]: f16 d, f16 m, u32 high bits, 16 bytes of nibbles -> [N, 32] = d * q + m."""
    d, m = _f16(blk[:, :2]), _f16(blk[:, 2:4])
    low = _nibbles(blk[:, 8:], 16).reshape(-1, 32)
    q = (low | (_q5_high(blk[:, 4:8]) << 4)).float()
    return d * q + m


def _q8_0(blk: torch.Tensor) -> torch.Tensor:
    """blk [N, 34]: f16 d, 32 int8 -> [N, 32] = q * d."""
    d = _f16(blk[:, :2])
    q = blk[:, 2:].contiguous().view(torch.int8).float()
    return q * d


# ---- 256-value K-quant super-blocks -----------------------------------------------------------------
def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> (scale [N, 8], min [N, 8]) 6-bit integers, as uint8."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _q4_k(blk: torch.Tensor) -> torch.Tensor:
    """blk [N, 144]: f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes -> [N, 256] = d*sc*q - dmin*m per 32."""
    n = blk.shape[0]
    d, dmin = _f16(blk[:, :2]), _f16(blk[:, 2:4])
    sc, mn = _k_scale_min(blk[:, 4:16])
    ds = (d * sc.float()).view(n, 8, 1)
    dm = (dmin * mn.float()).view(n, 8, 1)
    q = _nibbles(blk[:, 16:].reshape(n, 4, 32), 32).reshape(n, 8, 32).float()
    return (ds * q - dm).reshape(n, QK_K)


def _q5_k(blk: torch.Tensor) -> torch.Tensor:
    """blk [N, 176]: f16 d, f16 dmin, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes -> [N, 256]."""
    n = blk.shape[0]
    d, dmin = _f16(blk[:, :2]), _f16(blk[:, 2:4])
    sc, mn = _k_scale_min(blk[:, 4:16])
    ds = (d * sc.float()).view(n, 8, 1)
    dm = (dmin * mn.float()).view(n, 8, 1)
    low = _nibbles(blk[:, 48:].reshape(n, 4, 32), 32).reshape(n, 8, 32)
    high = _bits(blk[:, 16:48], list(range(8)), 1)  # [N, 8, 32]
    q = (low | (high << 4)).float()
    return (ds * q - dm).reshape(n, QK_K)


def _q6_k(blk: torch.Tensor) -> torch.Tensor:
    """blk [N, 210]: 128 low-nibble bytes, 64 high-2-bit bytes, 16 int8 scales, f16 d -> [N, 256]."""
    n = blk.shape[0]
    ql, qh = blk[:, :128], blk[:, 128:192]
    scales = blk[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blk[:, 208:210])
    dsc = (d * scales).view(n, 16, 1)
    low = _nibbles(ql.reshape(n, 2, 64), 64).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (dsc * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


BLOCK_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
TORCH_TYPES = tuple(FLOAT_TYPES) + tuple(BLOCK_DEQUANT)  # what moepage computes without ggml's library


def is_quantized(t: GGMLType) -> bool:
    return t.block_size > 1


def ggml_backend():
    """ggml's CPU kernels (kernels/ggml_cpu.py), or None where they are unavailable."""
    from moepage.kernels import ggml_cpu  # imported here: ggml_cpu builds a C++ module, this module stays light

    return ggml_cpu.backend()


def can_compute(t: GGMLType) -> bool:
    """Whether moepage can dequantize (and multiply) tensors of type t on this machine."""
    if t.name in TORCH_TYPES:
        return True
    b = ggml_backend()
    return b is not None and b.dequantizes(t.id) and b.multiplies(t.id)


def computable_types() -> list[str]:
    return [t.name for t in TYPES.values() if can_compute(t)]


def unsupported(t: GGMLType, tensor: str) -> UnsupportedQuantType:
    hint = "" if ggml_backend() is not None else "; `pip install libggml-python` adds every type ggml has"
    return UnsupportedQuantType(f"unsupported quant type {t.name} in tensor {tensor!r} (moepage computes "
                                f"{', '.join(computable_types())}{hint})")


def dequantize(raw: torch.Tensor, qtype: GGMLType | int | str, shape: tuple[int, ...], tensor: str = "?",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw: the tensor's bytes (uint8, any shape) -> float tensor of `shape` ([..., C], C = ne[0]) in `dtype`.

    F16/BF16/F32 keep their values exactly; quantized types are dequantized in float32 (as ggml does) and then
    cast to `dtype`. This is the torch reference; QuantizedTensor.dequantize uses ggml's own decoder when present.
    """
    t = qtype if isinstance(qtype, GGMLType) else ggml_type(qtype, tensor)
    raw = raw.reshape(-1)
    if raw.dtype != torch.uint8:
        raise TypeError(f"tensor {tensor!r}: dequantize expects uint8 bytes, got {raw.dtype}")
    check_size(raw, t, shape, tensor)
    if t.name in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[t.name]).view(shape).to(dtype)
    fn = BLOCK_DEQUANT.get(t.name)
    if fn is None:
        raise unsupported(t, tensor)
    blocks = raw.view(-1, t.type_size)  # [N, S]
    return fn(blocks).view(shape).to(dtype)


def check_size(raw: torch.Tensor, t: GGMLType, shape: tuple[int, ...], tensor: str) -> None:
    if shape and shape[-1] % t.block_size:
        raise ValueError(f"tensor {tensor!r}: row length {shape[-1]} is not a multiple of the {t.name} block "
                         f"size {t.block_size}")
    want = t.nbytes(tuple(shape))
    if raw.numel() != want:
        raise ValueError(f"tensor {tensor!r}: {raw.numel()} bytes do not hold {t.name} of shape {tuple(shape)} "
                         f"({want} bytes)")


# ---- quantized tensors held in memory ---------------------------------------------------------------
def backend_for(q: "QuantizedTensor"):
    """ggml's CPU kernels when they multiply q (a contiguous CPU tensor of a type ggml has), else None."""
    if q.data.device.type != "cpu" or not q.data.is_contiguous() or len(q.shape) != 2 or q.type.name == "F32":
        return None
    b = ggml_backend()
    return b if b is not None and b.multiplies(q.type.id) else None


INTERLEAVED = 256  # a kernel type id with this bit: the type's 8-row interleaved layout (csrc/ggml_cpu_interleave.h)


@dataclass
class QuantizedTensor:
    """A GGML tensor kept as its stored bytes: data [R * row_bytes] uint8, logical shape (R, C).

    interleaved: the bytes are in ggml's 8-row interleaved layout (interleaved_for_matvec), which only the kernels
    read; dequantize() gives the same values either way."""

    data: torch.Tensor
    type: GGMLType
    shape: tuple[int, ...]
    name: str = "?"
    interleaved: bool = False

    @property
    def kernel_type(self) -> int:
        """The type id the C++ kernels take: the GGML type id, with INTERLEAVED set for the interleaved layout."""
        return self.type.id | (INTERLEAVED if self.interleaved else 0)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def rows(self) -> int:
        rows = 1
        for s in self.shape[:-1]:
            rows *= s
        return rows

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if is_quantized(self.type) and self.data.device.type == "cpu":
            b = ggml_backend()
            if b is not None and b.dequantizes(self.type.id):
                check_size(self.data, self.type, self.shape, self.name)
                out = b.dequantize(self.data.contiguous(), self.kernel_type, self.rows, self.shape[-1])
                return out.view(self.shape).to(dtype)
        if self.interleaved:
            raise ValueError(f"tensor {self.name!r}: interleaved bytes need ggml's CPU library to dequantize")
        return dequantize(self.data, self.type, self.shape, self.name, dtype)

    def to(self, device) -> "QuantizedTensor":
        if self.interleaved and torch.device(device).type != "cpu":
            raise ValueError(f"tensor {self.name!r}: interleaved bytes stay on the CPU")
        return QuantizedTensor(self.data.to(device), self.type, self.shape, self.name, self.interleaved)


def interleaved_for_matvec(q: QuantizedTensor) -> QuantizedTensor:
    """q with its bytes rearranged in place into ggml's 8-row interleaved layout where this CPU's ggml multiplies
    that layout faster (Q4_K on AVX2 and on NEON with int8 matmul, as llama.cpp's CPU backend repacks it), else q.
    The bytes are q's own (a fresh read): nothing else may hold them. Only for matrices used in matmuls (not in an
    embedding lookup, which reads rows)."""
    b = backend_for(q)
    if b is None or q.interleaved or not b.interleaves(q.type.id) or q.shape[0] % 8:
        return q
    b.relayout_(q.data, q.type.id, q.shape[0], q.shape[1])
    return QuantizedTensor(q.data, q.type, q.shape, q.name, True)
