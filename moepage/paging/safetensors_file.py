"""A safetensors file read with pread: header parsed once, each tensor one contiguous byte range.

Never maps the file, so the OS page cache is not what holds the model.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 256 * 1024 * 1024


class CheckpointError(ValueError):
    """A weight file is missing, truncated or malformed; the message names the file."""


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


class SafetensorsFile:
    def __init__(self, path: str, drop_page_cache: bool = False):
        self.path = str(path)
        self.drop_page_cache = drop_page_cache
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open weight file: {e.strerror}") from None
        self.size = os.fstat(self.fd).st_size
        self.tensors, self.metadata = self._parse_header()

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

    def read_bytes(self, start: int, length: int) -> bytearray:
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            n = os.preadv(self.fd, [view[got:]], start + got)
            if n <= 0:
                raise CheckpointError(f"{self.path}: file truncated while reading bytes [{start}, {start + length})")
            got += n
        if self.drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)
        return buf

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = self.read_bytes(info.start, info.nbytes)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).view(info.shape)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
