"""A safetensors file read with pread: header parsed once, each tensor one contiguous byte range."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from moepage.paging.pread import CheckpointError, PreadFile

__all__ = ["CheckpointError", "SafetensorsFile", "TensorInfo", "DTYPES", "DTYPE_NAMES"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,  # F8_E4M3: FP8 checkpoints (paging/fp8_experts.py)
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the safetensors library's own limit
MAX_DIMS = 8


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def shown(name) -> str:
    """A name read from a file, quoted and cut short for an error message."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


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
        if n > MAX_HEADER or 8 + n > self.size:  # the number is not shown: it may be the bytes of some other file
            raise CheckpointError(f"{self.path}: not a safetensors file: declared header length exceeds the file "
                                  f"({self.size} bytes)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not valid UTF-8 JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: __metadata__ is not a map of strings")
        base = 8 + n
        tensors = {}
        for name, info in header.items():
            tensors[name] = self._tensor_info(name, info, base)
        return tensors, metadata

    def _tensor_info(self, name: str, info, base: int) -> TensorInfo:
        where = f"{self.path}: tensor {shown(name)}"
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where} has a malformed header entry or an unsupported dtype") from None
        if len(shape) > MAX_DIMS or not all(_is_int(d) for d in shape) or not (_is_int(start) and _is_int(end)):
            raise CheckpointError(f"{where}: shape and data_offsets must be integers (at most {MAX_DIMS} dims)")
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{where}: negative dimension in shape {list(shape)}")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if not 0 <= start <= end or base + end > self.size:
            raise CheckpointError(f"{where}: data_offsets lie outside the file ({self.size} bytes)")
        if end - start != math.prod(shape) * itemsize:
            raise CheckpointError(f"{where}: data_offsets span {end - start} bytes, shape {list(shape)} "
                                  f"{info['dtype']} needs {math.prod(shape) * itemsize}")
        if (base + start) % itemsize:
            raise CheckpointError(f"{where}: data at byte {base + start} is not aligned to its {itemsize}-byte "
                                  f"{info['dtype']} elements")
        return TensorInfo(name, dtype, shape, base + start, base + end)

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

