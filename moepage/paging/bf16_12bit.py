"""A lossless 12-bit encoding of bf16 tensors: expert shards that are a quarter smaller on disk, bit for bit the same.

The high byte of a bf16 weight is its sign and seven exponent bits. Trained and initialised weights cluster in a few
binades, so a tensor's 15 most frequent high bytes cover almost every value: each value keeps its low byte (8 bits)
and a 4-bit code for the high byte; the rare others (code 15) are stored whole in an escape list. 12 bits a value
instead of 16 means 25% fewer bytes to read per page-in when a model does not fit in memory (the paged case is
disk-bound); decoding runs in the page-in threads at memory speed (csrc/bf16_unpack.cpp: AVX512-VBMI2, or the portable
decoder of csrc/bf16_12bit.h on AVX2, NEON and the rest; plain torch without a compiler, 6-8 ms an expert).

Layout of a tensor of N values (B = ceil(N / 64) blocks of 64), each part a uint8 tensor:
  lo [N]      the low bytes
  codes [32B] byte j of block b: code of value 64b+j in the low nibble, of value 64b+32+j in the high nibble
  exc [X]     the high bytes of the escaped values, in order
  lut [16]    high byte of codes 0..14 (entry 15 unused)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from moepage.kernels import native

ENCODING = "bf16-12bit"
ESCAPE = 15
PARTS = ("lo", "codes", "exc", "lut")


class EncodingError(ValueError):
    """Parts of an encoded tensor that do not fit together (a corrupt or hand-edited shard)."""


@dataclass
class Packed:
    lo: torch.Tensor
    codes: torch.Tensor
    exc: torch.Tensor
    lut: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, p).numel() for p in PARTS)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The parts as safetensors entries `name.lo`, `name.codes`, ..."""
        return {f"{name}.{p}": getattr(self, p) for p in PARTS}


def pack(t: torch.Tensor) -> Packed:
    """bf16 tensor -> its 12-bit encoding (any shape; the caller keeps the shape)."""
    if t.dtype != torch.bfloat16:
        raise EncodingError(f"{ENCODING} encodes bf16 tensors, not {t.dtype}")
    pairs = t.detach().contiguous().view(-1).view(torch.uint8).view(-1, 2)  # [N, 2] little-endian: low, high
    lo, hi = pairs[:, 0].clone(), pairs[:, 1]
    n = hi.numel()
    top = torch.bincount(hi.long(), minlength=256).argsort(descending=True, stable=True)[:ESCAPE]
    lut = torch.zeros(16, dtype=torch.uint8)
    lut[:ESCAPE] = top.to(torch.uint8)
    code_of = torch.full((256,), ESCAPE, dtype=torch.uint8)
    code_of[top] = torch.arange(ESCAPE, dtype=torch.uint8)
    code = code_of[hi.long()]  # [N]
    exc = hi[code == ESCAPE].clone()
    blocks = torch.zeros(-(-n // 64) * 64, dtype=torch.uint8)  # padding codes are 0: they use no escape byte
    blocks[:n] = code
    blocks = blocks.view(-1, 64)
    codes = (blocks[:, :32] | (blocks[:, 32:] << 4)).contiguous().view(-1)
    return Packed(lo, codes, exc, lut)


def _check(p: Packed, n: int):
    for part in PARTS:
        t = getattr(p, part)
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise EncodingError(f"{ENCODING}: part {part!r} is {t.dtype} {tuple(t.shape)}, not a 1-D uint8 tensor")
    want = {"lo": n, "codes": -(-n // 64) * 32, "lut": 16}
    for part, size in want.items():
        if getattr(p, part).numel() != size:
            raise EncodingError(f"{ENCODING}: part {part!r} has {getattr(p, part).numel()} bytes, "
                                f"{size} expected for {n} values")


def codes_of(codes: torch.Tensor, n: int) -> torch.Tensor:
    """The packed code bytes -> the code of each of the n values [n]."""
    blocks = codes.view(-1, 32)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=1).reshape(-1)[:n]


def unpack_torch(p: Packed, out: torch.Tensor) -> torch.Tensor:
    """The reference decoder (plain torch): fills out (bf16, contiguous) and returns it."""
    n = out.numel()
    _check(p, n)
    code = codes_of(p.codes, n)  # [N]
    hi = p.lut[code.long()]
    escaped = code == ESCAPE
    count = int(escaped.sum())
    if count != p.exc.numel():
        raise EncodingError(f"{ENCODING}: {p.exc.numel()} escape bytes for {count} escaped values")
    hi[escaped] = p.exc
    out.view(-1).view(torch.uint8).view(-1, 2).copy_(torch.stack([p.lo, hi], dim=1))
    return out


def unpack_into(p: Packed, out: torch.Tensor) -> torch.Tensor:
    """Decode p into out (bf16, contiguous, on the CPU) with the C++ decoder where it runs, else plain torch."""
    _check(p, out.numel())
    kernel = native.load("bf16_unpack") if out.device.type == "cpu" else None
    if kernel is None:
        return unpack_torch(p, out)
    try:
        kernel.unpack_bf16(p.lo, p.codes, p.exc, p.lut, out)
    except RuntimeError as e:
        raise EncodingError(str(e).splitlines()[0]) from None
    return out


class PackedMatrix:
    """A resident bf16 matrix W [N, K] held in the 12-bit form (a quarter less memory and memory traffic), with
    x @ W^T computed straight from it: a decode token's row by the fused C++ kernel (bit for bit the plain bf16
    kernel's result), more rows by decoding one block of rows at a time into a small bf16 buffer. Each block of
    ROWS rows has its own table, so the matrix can be built from blocks read one at a time (no full bf16 copy)."""

    ROWS = 4096  # rows per table and per decoded block (8 MiB of bf16 at K = 1024)

    def __init__(self, shape: tuple[int, int], read_rows):
        """read_rows(n0, n1) -> rows [n1 - n0, K] of the bf16 matrix; called for one block of ROWS rows at a time."""
        n, k = shape
        if k % 64:
            raise EncodingError(f"PackedMatrix needs a multiple of 64 columns, not {k}")
        self.shape = (n, k)
        self.lo = torch.empty(n * k, dtype=torch.uint8)
        self.codes = torch.empty(n * k // 2, dtype=torch.uint8)
        self.luts = torch.empty(-(-n // self.ROWS), 16, dtype=torch.uint8)
        self.row_exc = torch.zeros(n + 1, dtype=torch.int64)
        escapes = []
        for i, r in enumerate(range(0, n, self.ROWS)):
            m = min(self.ROWS, n - r)
            block = read_rows(r, r + m)
            if tuple(block.shape) != (m, k):
                raise EncodingError(f"rows {r}..{r + m} came back as {tuple(block.shape)}, not {(m, k)}")
            p = pack(block)
            self.lo[r * k : (r + m) * k] = p.lo
            self.codes[r * k // 2 : (r + m) * k // 2] = p.codes
            self.luts[i] = p.lut
            escapes.append(p.exc)
            per_row = (codes_of(p.codes, m * k).view(m, k) == ESCAPE).sum(1)  # [m]
            self.row_exc[r + 1 : r + m + 1] = self.row_exc[r] + torch.cumsum(per_row, 0)
        self.exc = torch.cat(escapes) if escapes else torch.empty(0, dtype=torch.uint8)

    @classmethod
    def of(cls, w: torch.Tensor) -> "PackedMatrix":
        if w.dim() != 2 or w.dtype != torch.bfloat16:
            raise EncodingError(f"PackedMatrix holds a 2-D bf16 matrix, not {w.dtype} {tuple(w.shape)}")
        return cls(tuple(w.shape), lambda n0, n1: w[n0:n1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.lo, self.codes, self.exc, self.luts, self.row_exc))

    def block(self, i: int) -> torch.Tensor:
        """Rows [i * ROWS, (i + 1) * ROWS) decoded to bf16."""
        n, k = self.shape
        n0, n1 = i * self.ROWS, min(n, (i + 1) * self.ROWS)
        part = Packed(self.lo[n0 * k : n1 * k], self.codes[n0 * k // 2 : n1 * k // 2],
                      self.exc[int(self.row_exc[n0]) : int(self.row_exc[n1])], self.luts[i])
        return unpack_into(part, torch.empty(n1 - n0, k, dtype=torch.bfloat16))

    def linear(self, x: torch.Tensor, linear) -> torch.Tensor:
        """x [M, K] @ W^T -> [M, N]; linear(x, w) is the plain kernel the decoded blocks go through."""
        if x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu" and fused_kernel() is not None:
            return fused_kernel().linear_12bit(x.contiguous(), self.lo, self.codes, self.exc, self.row_exc,
                                               self.luts, self.ROWS)
        out = torch.empty(x.shape[0], self.shape[0], dtype=x.dtype, device=x.device)
        for i in range(self.luts.shape[0]):
            out[:, i * self.ROWS : (i + 1) * self.ROWS] = linear(x, self.block(i).to(x.device))
        return out


@functools.cache
def fused_kernel():
    """The C++ module with linear_12bit (bit for bit bf16_decode's linear of the same build: every target but one with
    AVX512-BF16 and no VBMI2), else None."""
    module = native.load("bf16_unpack")
    return module if hasattr(module, "linear_12bit") else None
