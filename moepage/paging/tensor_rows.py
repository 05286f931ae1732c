"""A 2-D tensor kept on disk and read a row at a time: an embedding table outside the memory budget, or an lm_head
read a block of rows at a time while it is packed.

Shape legend: T tokens, V rows (vocabulary), C columns, B bytes of one stored row.
"""
from __future__ import annotations

from typing import Callable

import torch

from moepage.paging.pread import ExpertReadError, PreadFile
from moepage.paging.sources import changed_error

Decode = Callable[[torch.Tensor, int], torch.Tensor]  # stored bytes [N, B], N -> values [N, C]


class TensorRows:
    def __init__(self, f: PreadFile, name: str, start: int, shape: tuple[int, int], row_bytes: int, decode: Decode,
                 dtype: torch.dtype, device, stored_dtype: torch.dtype | None = None):
        """A tensor whose extent the file's header reader checked against the file; stored_dtype: the rows' torch
        dtype where they are stored as plain values (None: GGML blocks)."""
        self.f, self.name, self.start, self.row_bytes, self.decode = f, name, start, row_bytes, decode
        self.rows, self.cols = shape
        self.dtype, self.device, self.stored_dtype = dtype, torch.device(device), stored_dtype

    @classmethod
    def plain(cls, f: PreadFile, name: str, start: int, shape: tuple[int, int], stored: torch.dtype,
              dtype: torch.dtype, device) -> "TensorRows":
        """Rows stored as plain `stored` values (safetensors)."""
        cols = shape[1]
        return cls(f, name, start, shape, cols * stored.itemsize, lambda raw, n: raw.view(stored).view(n, cols),
                   dtype, device, stored)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] (any shape) -> rows [T, C] in the compute dtype."""
        if self.f.changed():
            raise ExpertReadError(str(changed_error(self.f.path, f"rows of {self.name}")))
        flat = ids.reshape(-1).tolist()
        raw = torch.empty(len(flat), self.row_bytes, dtype=torch.uint8)  # [T, B]
        for i, row in enumerate(flat):
            if not 0 <= row < self.rows:
                raise IndexError(f"token id {row} is outside the embedding table ({self.rows} rows)")
            self.f.read_into(memoryview(raw[i].numpy()), self.start + row * self.row_bytes)
        out = self.decode(raw, len(flat))
        return out.to(device=self.device, dtype=self.dtype).view(*ids.shape, self.cols)

    def block(self, n0: int, n1: int) -> torch.Tensor:
        """Rows [n0, n1) in one read, in the compute dtype [n1 - n0, C]."""
        span = self.f.read_span(self.start + n0 * self.row_bytes, self.start + n1 * self.row_bytes)
        return self.decode(span, n1 - n0).to(device=self.device, dtype=self.dtype)
