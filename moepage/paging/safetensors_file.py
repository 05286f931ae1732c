"""A safetensors file read with pread: header parsed once, each tensor one contiguous byte range."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from moepage.paging.pread import CheckpointError, PreadFile

__all__ = ["CheckpointError", "SafetensorsFile", "TensorInfo", "DTYPES", "DTYPE_NAMES"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 256 * 1024 * 1024
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile(PreadFile):
    def __init__(self, path: str, drop_page_cache: bool = False, header: tuple[dict, dict] | None = None):
        """header: (tensors, metadata) parsed by an earlier open of the same unchanged file (skips the parse)."""
        super().__init__(path, drop_page_cache, "weight file")
        self.tensors, self.metadata = header if header is not None else self._parse_header()

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict]:
        raw = os.pread(self.fd, 8, 0)
        if len(raw) < 8:
            raise CheckpointError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > self.size:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (declared length {n}, file {self.size} bytes)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: not a JSON object")
        base = 8 + n
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed or unsupported header entry {info!r}") from None
            count = 1
            for s in shape:
                count *= s
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if end - start != count * itemsize or start < 0 or base + end > self.size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} byte range [{start}, {end}) does not match shape {shape} "
                    f"{info['dtype']} or lies past the end of the file ({self.size} bytes)"
                )
            tensors[name] = TensorInfo(name, dtype, shape, base + start, base + end)
        return tensors, header.get("__metadata__") or {}

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.tensor_in(self.read_span(info.start, info.end), info, info.start)

    @staticmethod
    def tensor_in(span: torch.Tensor, info: TensorInfo, span_start: int) -> torch.Tensor:
        """The tensor `info` as a view into span (uint8 bytes read from span_start)."""
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        raw = span[info.start - span_start : info.end - span_start]
        return raw.view(info.dtype).view(info.shape)

