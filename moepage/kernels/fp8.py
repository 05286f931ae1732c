"""Block-scaled FP8 weights as DeepSeek-V3, Kimi K2 and the GLM FP8 checkpoints publish them: float8_e4m3fn values,
one byte each, and a float32 `weight_scale_inv` per block of br x bc values (weight_block_size, 128 x 128 there);
value (r, c) = E4M3[w[r, c]] * scale_inv[r // br, c // bc].

`Fp8Tensor` holds one [R, C] matrix as those bytes; `linear` multiplies on them with the C++ kernel
(csrc/fp8.cpp over csrc/fp8_core.h: decode a row, fp32 dot), or torch where the kernel is unavailable. Decoding is
the one fp32 multiply transformers' Fp8Dequantize does; with `bf16` each value is then rounded to bf16, the weight
transformers holds in a bf16 model.

Shape legend: R rows (output features), C columns (input features), br x bc a scale block, T tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moepage.kernels import native

MAX_BLOCK = 1 << 16  # a block side beyond any published checkpoint's (128)


def scale_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """(ceil(R / br), ceil(C / bc)): the scale_inv shape of an [R, C] matrix."""
    (R, C), (br, bc) = shape, block
    return -(-R // br), -(-C // bc)


def dequantize_reference(w: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w float8_e4m3fn or its uint8 bytes [R, C], scales float32 [gr, gc] -> [R, C] in dtype: fp8 -> float32, times
    the block's scale in float32, then dtype (transformers' Fp8Dequantize, also for a ragged last block)."""
    R, C = w.shape
    br, bc = block
    q = (w.view(torch.float8_e4m3fn) if w.dtype == torch.uint8 else w).to(torch.float32)
    s = scales.to(torch.float32).repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]
    return (q * s).to(dtype)


@dataclass
class Fp8Tensor:
    """One [R, C] matrix: data uint8 [R * C] (E4M3 bytes), scales float32 [gr, gc], block (br, bc)."""

    data: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    block: tuple[int, int]
    name: str = "?"

    def __post_init__(self):
        rows, cols = self.shape
        br, bc = self.block
        if rows < 0 or cols < 0 or not (1 <= br <= MAX_BLOCK and 1 <= bc <= MAX_BLOCK):
            raise ValueError(f"{self.name}: bad FP8 shape {[rows, cols]} or block {[br, bc]}")
        if self.data.dtype == torch.float8_e4m3fn:
            self.data = self.data.view(torch.uint8)
        if self.data.dtype != torch.uint8 or self.data.numel() != rows * cols:
            raise ValueError(f"{self.name}: {self.data.numel()} {self.data.dtype} values do not hold FP8 of shape "
                             f"{[rows, cols]}")
        grid = scale_grid(self.shape, self.block)
        if self.scales.dtype != torch.float32 or tuple(self.scales.shape) != grid:
            raise ValueError(f"{self.name}: scale_inv {self.scales.dtype} {list(self.scales.shape)} is not the "
                             f"float32 {list(grid)} grid of {[rows, cols]} in {[br, bc]} blocks")
        self.data = self.data.reshape(-1)

    @property
    def nbytes(self) -> int:
        return self.data.numel() + self.scales.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_reference(self.data.view(self.shape), self.scales, self.block, dtype)

    def to(self, device) -> "Fp8Tensor":
        return Fp8Tensor(self.data.to(device), self.scales.to(device), self.shape, self.block, self.name)


def _module():
    return native.load("fp8")


def linear(x: torch.Tensor, w: Fp8Tensor) -> torch.Tensor:
    """x [T, C] @ w^T -> [T, R] in x's dtype: an fp32 dot of the decoded values (rounded to bf16 first when x is
    bf16, as a bf16 model's dequantized weight is), rounded once to x's dtype."""
    bf16 = x.dtype == torch.bfloat16
    m = _module() if x.device.type == "cpu" and w.data.device.type == "cpu" else None
    if m is not None:
        y = m.linear(x.float().contiguous(), w.data.contiguous(), w.scales.contiguous(), w.shape[0], *w.block, bf16)
    else:
        y = x.float() @ w.dequantize(torch.bfloat16 if bf16 else torch.float32).float().to(x.device).T
    return y.to(x.dtype)


def dequantize(w: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-> [R, C] in dtype with the C++ decoder where built (the values of Fp8Tensor.dequantize)."""
    m = _module() if w.data.device.type == "cpu" else None
    if m is None:
        return w.dequantize(dtype)
    return m.dequantize(w.data.contiguous(), w.scales.contiguous(), *w.shape, *w.block,
                        dtype == torch.bfloat16).to(dtype)
