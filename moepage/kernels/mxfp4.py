"""MXFP4 weights (OCP microscaling FP4: 32 FP4 E2M1 values share one E8M0 power-of-two scale), 4.25 bits a weight.

Two byte layouts of the same numbers:
- the published gpt-oss safetensors layout: `*_blocks` uint8 [..., R, G, 16] and `*_scales` uint8 [..., R, G];
  value 2j of a block is the low nibble of byte j, value 2j + 1 the high nibble; value = FP4[code] * 2^(scale - 127)
  (transformers' `convert_moe_packed_tensors`, which also transposes to [..., C, R]);
- GGML's MXFP4 type (GGUF): 17-byte blocks [e, qs[16]]; value j is the low nibble of qs[j], value j + 16 its high
  nibble; value = KV[code] * 2^(e - 128) with KV the doubled FP4 values (ggml-quants.c `dequantize_row_mxfp4`).
Both give FP4[code] * 2^(e - 127), exactly, for every scale byte e (255, NaN in the OCP format, included: the
references compute 2^128 * FP4, which is inf only where it overflows).

`Mxfp4Tensor` holds the safetensors layout of one [R, C] matrix; `linear` multiplies it on those bytes with the C++
kernel (csrc/mxfp4_core.h: blocks decoded into fp32 lanes by byte lookups, fp32 FMAs in one fixed order on
AVX2 and portable builds alike), or torch where the kernel is unavailable.

Shape legend: R rows (output features), C columns (input features), G = C / 32 blocks per row, T tokens,
N GGML blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moepage.kernels import native

BLOCK = 32  # values per block
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GGML_KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # ggml's kvalues_mxfp4 (doubled FP4)
GGML_BLOCK_BYTES = 17


def nbytes(rows: int, cols: int) -> int:
    """Bytes of an [R, C] MXFP4 matrix: C/2 bytes of codes and C/32 scale bytes per row."""
    return rows * (cols // 2 + cols // BLOCK)


def dequantize_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> float32 [..., G * 32]: the safetensors layout decoded as
    transformers decodes it (a lookup, then torch.ldexp), without its transpose."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[-1:] != (16,) or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    out = torch.empty(*blocks.shape[:-1], 32, dtype=torch.float32)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    torch.ldexp(out, (scales.to(torch.int32) - 127).unsqueeze(-1), out=out)
    return out.reshape(*blocks.shape[:-2], -1)


def to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The safetensors layout [..., G, 16] + [..., G] -> GGML MXFP4 bytes [..., G * 17] of the same values (the
    nibble reordering of llama.cpp's convert_hf_to_gguf `transform_nibble_layout`)."""
    lo, hi = blocks & 0x0F, blocks >> 4  # values 2j, 2j + 1
    codes = torch.stack((lo, hi), dim=-1).reshape(*blocks.shape[:-1], 32)  # [..., G, 32] in value order
    qs = codes[..., :16] | (codes[..., 16:] << 4)  # GGML: value j low nibble, value j + 16 high nibble
    return torch.cat((scales.unsqueeze(-1), qs), dim=-1).reshape(*scales.shape[:-1], -1)


def from_ggml(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGML MXFP4 bytes [..., G * 17] -> (blocks [..., G, 16], scales [..., G]) of the safetensors layout."""
    blk = raw.reshape(*raw.shape[:-1], -1, GGML_BLOCK_BYTES)
    qs = blk[..., 1:]
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # [..., G, 32] in value order
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous(), blk[..., 0].contiguous()


def dequantize_ggml(blk: torch.Tensor) -> torch.Tensor:
    """blk [N, 17] GGML MXFP4 blocks -> float32 [N, 32], as ggml's dequantize_row_mxfp4 (KV[code] * 2^(e - 128))."""
    e = blk[:, 0].to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    d = bits.view(torch.float32).unsqueeze(-1)  # [N, 1]
    kv = torch.tensor(GGML_KVALUES, dtype=torch.float32)
    qs = blk[:, 1:]
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1).long()  # [N, 32]
    return kv[codes] * d


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., C] -> (blocks uint8 [..., C/32, 16], scales uint8 [..., C/32]) of the safetensors layout: each
    block's scale is the smallest power of two that puts its largest magnitude in FP4's range (at most 6: nothing
    saturates), each value the nearest FP4 value (ties to the lower code). For making MXFP4 checkpoints; decoding is exact, this is not."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"rows of {w.shape[-1]} values are not whole {BLOCK}-value blocks")
    x = w.float().reshape(*w.shape[:-1], -1, BLOCK)  # [..., G, 32]
    amax = x.abs().amax(dim=-1, keepdim=True)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax.clamp_min(2.0 ** -127) / 6)), torch.zeros_like(amax))
    exp = exp.clamp(-127, 127)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (torch.ldexp(x, -exp.to(torch.int32)).unsqueeze(-1) - lut).abs().argmin(dim=-1).to(torch.uint8)
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks.contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8).contiguous()


@dataclass
class Mxfp4Tensor:
    """One [R, C] matrix as MXFP4 bytes of the safetensors layout: blocks uint8 [R * G * 16], scales uint8 [R * G]."""

    blocks: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    name: str = "?"

    def __post_init__(self):
        rows, cols = self.shape
        if rows < 0 or cols < 0 or cols % BLOCK:
            raise ValueError(f"{self.name}: MXFP4 rows of {cols} values are not whole {BLOCK}-value blocks")
        if self.blocks.dtype != torch.uint8 or self.scales.dtype != torch.uint8:
            raise ValueError(f"{self.name}: MXFP4 blocks and scales must be uint8")
        if self.blocks.numel() != rows * cols // 2 or self.scales.numel() != rows * cols // BLOCK:
            raise ValueError(f"{self.name}: {self.blocks.numel()} block bytes and {self.scales.numel()} scale bytes "
                             f"do not hold MXFP4 of shape {[rows, cols]}")
        self.blocks = self.blocks.reshape(-1)
        self.scales = self.scales.reshape(-1)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> [R, C] in dtype (every MXFP4 value is exact in bf16 and fp32)."""
        rows, cols = self.shape
        g = cols // BLOCK
        return dequantize_reference(self.blocks.view(rows, g, 16), self.scales.view(rows, g)).to(dtype)

    def to(self, device) -> "Mxfp4Tensor":
        return Mxfp4Tensor(self.blocks.to(device), self.scales.to(device), self.shape, self.name)


def _module():
    return native.load("mxfp4")


def linear(x: torch.Tensor, w: Mxfp4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, C] @ w^T (+ bias [R]) -> [T, R] in x's dtype: an fp32 dot of the exact decoded values, rounded once to
    x's dtype, then the bias."""
    m = _module() if x.device.type == "cpu" and w.blocks.device.type == "cpu" else None
    if m is not None:
        y = m.linear(x.float().contiguous(), w.blocks.contiguous(), w.scales.contiguous(), w.shape[0])
    else:
        y = x.float() @ w.dequantize(torch.float32).to(x.device).T
    y = y.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)  # the bias added in x's dtype, as x @ W + b is


def dequantize(w: Mxfp4Tensor) -> torch.Tensor:
    """-> float32 [R, C] with the C++ decoder where built (the same values as Mxfp4Tensor.dequantize)."""
    m = _module() if w.blocks.device.type == "cpu" else None
    if m is None:
        return w.dequantize(torch.float32)
    return m.dequantize(w.blocks.contiguous(), w.scales.contiguous(), *w.shape)
