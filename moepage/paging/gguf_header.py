"""A bounded parse of a GGUF header: metadata and tensor table read with pread, every count, length, dimension
and offset checked against the file's size (and GGUF's own limits) before anything is allocated for it.

Layout (GGUF v2/v3, little-endian): magic, u32 version, u64 tensor count, u64 key count; each key a string,
a u32 value type and the value (arrays: u32 element type, u64 length, elements); each tensor a name, u32 dim
count, u64 dims (innermost first), u32 GGML type and u64 offset from the aligned start of the data.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from moepage.kernels.ggml import GGMLType, UnsupportedQuantType, ggml_type
from moepage.paging.pread import CheckpointError, PreadFile
from moepage.paging.safetensors_file import shown

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)
STRING, ARRAY = 8, 9
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
           12: "<f8"}  # value type -> numpy dtype (7: bool, stored as one byte)
BOOL = 7
MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, one dim, type, offset
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY = 65535
MAX_NAME = 1024
MAX_STRING = 1 << 24  # bytes of one string value (chat templates are tens of KB)
MAX_ARRAY = 1 << 22  # elements of one array (vocabularies and merge lists are a few hundred thousand)
MAX_ALIGNMENT = 1 << 20
CHUNK = 1 << 20


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type: GGMLType
    shape: tuple[int, ...]  # torch order: outermost first, ne[0] last
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def end(self) -> int:
        return self.start + self.nbytes


@dataclass
class GGUFHeader:
    version: int
    metadata: dict = field(default_factory=dict)
    field_types: dict = field(default_factory=dict)  # key -> (value type, array element type or None)
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)


class _Cursor:
    """Sequential reads from a PreadFile through a window of at most CHUNK bytes (or one larger value)."""

    def __init__(self, f: PreadFile):
        self.f, self.pos = f, 0
        self._buf, self._at = bytearray(), 0

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.f.path}: truncated or corrupt GGUF header: {what} at byte {self.pos} "
                               f"does not fit in the file ({self.f.size} bytes)")

    def left(self) -> int:
        return self.f.size - self.pos

    def take(self, n: int, what: str) -> bytearray:
        if n < 0 or n > self.left():
            raise self.fail(what)
        off = self.pos - self._at
        if off < 0 or off + n > len(self._buf):
            self._buf, self._at, off = self.f.read_bytes(self.pos, min(max(n, CHUNK), self.left())), self.pos, 0
        self.pos += n
        return self._buf[off : off + n]

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.unpack("<Q", what)
        if n > limit:
            raise CheckpointError(f"{self.f.path}: corrupt GGUF header: {what} at byte {self.pos} is longer than the "
                                  f"limit of {limit} bytes")
        return self.take(n, what).decode("utf-8", errors="replace")

    def strings(self, n: int, what: str, limit: int = MAX_STRING) -> list[str]:
        """n consecutive strings (u64 length, then the bytes) as string() reads them, without a call per field (a
        152k-token vocabulary and its merges are 300k strings); a string past the window, too long or past the end
        of the file goes through string(), which refills the window or raises."""
        out, unpack_from = [], struct.unpack_from
        for _ in range(n):
            buf, off = self._buf, self.pos - self._at
            if 0 <= off and off + 8 <= len(buf):
                (k,) = unpack_from("<Q", buf, off)
                if k <= limit and off + 8 + k <= len(buf):
                    out.append(buf[off + 8 : off + 8 + k].decode("utf-8", errors="replace"))
                    self.pos += 8 + k
                    continue
            out.append(self.string(what, limit))
        return out


def _count(c: _Cursor, what: str, each: int, limit: int) -> int:
    """A u64 count of items of at least `each` bytes: checked against what is left of the file and `limit`."""
    n = c.unpack("<Q", what)
    if n > limit:
        raise CheckpointError(f"{c.f.path}: corrupt GGUF header: {what} exceeds the limit of {limit}")
    if n * each > c.left():
        raise c.fail(what)
    return n


def _value(c: _Cursor, kind: int, key: str):
    if kind == STRING:
        return c.string(f"string value of {key}")
    if kind in SCALARS:
        dtype = np.dtype(SCALARS[kind])
        v = np.frombuffer(c.take(dtype.itemsize, f"value of {key}"), dtype)[0].item()
        return bool(v) if kind == BOOL else v
    raise CheckpointError(f"{c.f.path}: corrupt GGUF header: key {key} has unknown value type {kind}")


def _array(c: _Cursor, key: str) -> tuple[list, int]:
    sub = c.unpack("<I", f"array type of {key}")
    if sub == STRING:
        n = _count(c, f"length of array {key}", 8, MAX_ARRAY)
        return c.strings(n, f"element of array {key}"), sub
    if sub not in SCALARS:
        what = "arrays of arrays are not supported" if sub == ARRAY else f"unknown element type {sub}"
        raise CheckpointError(f"{c.f.path}: GGUF key {key}: {what}")
    dtype = np.dtype(SCALARS[sub])
    n = _count(c, f"length of array {key}", dtype.itemsize, MAX_ARRAY)
    values = np.frombuffer(c.take(n * dtype.itemsize, f"array {key}"), dtype)
    return (values != 0).tolist() if sub == BOOL else values.tolist(), sub


def _tensor(c: _Cursor) -> tuple[str, int, tuple[int, ...], int]:
    name = c.string("tensor name", MAX_NAME)
    n_dims = c.unpack("<I", f"dimension count of tensor {shown(name)}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise CheckpointError(f"{c.f.path}: tensor {shown(name)} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
    dims = struct.unpack(f"<{n_dims}q", c.take(8 * n_dims, f"dimensions of tensor {shown(name)}"))
    if any(d < 0 for d in dims):
        raise CheckpointError(f"{c.f.path}: tensor {shown(name)} has a negative dimension")
    kind = c.unpack("<I", f"type of tensor {shown(name)}")
    offset = c.unpack("<Q", f"offset of tensor {shown(name)}")
    return name, kind, tuple(reversed(dims)), offset


def parse_gguf_header(f: PreadFile) -> GGUFHeader:
    """The header of the GGUF file f; CheckpointError naming the file (and the key or tensor) when it is malformed."""
    c = _Cursor(f)
    if c.left() < 8 or c.take(4, "magic") != GGUF_MAGIC:
        raise CheckpointError(f"{f.path}: not a GGUF file (no {GGUF_MAGIC!r} magic)")
    version = c.unpack("<I", "version")
    if version not in VERSIONS:
        hint = " (a big-endian file?)" if version and version & 0xFFFF == 0 else ""
        raise CheckpointError(f"{f.path}: unsupported GGUF version {version}{hint}; moepage reads versions "
                              f"{', '.join(map(str, VERSIONS))}")
    n_tensors = _count(c, "tensor count", MIN_TENSOR_BYTES, 1 << 20)
    n_kv = _count(c, "metadata key count", MIN_KV_BYTES, 1 << 20)
    header = GGUFHeader(version)
    for _ in range(n_kv):
        key = c.string("metadata key", MAX_KEY)
        if key in header.metadata:
            raise CheckpointError(f"{f.path}: GGUF metadata key {shown(key)} appears twice")
        kind = c.unpack("<I", f"value type of {shown(key)}")
        if kind == ARRAY:
            header.metadata[key], sub = _array(c, shown(key))
        else:
            header.metadata[key], sub = _value(c, kind, shown(key)), None
        header.field_types[key] = (kind, sub)
    alignment = header.metadata.get("general.alignment", 32)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= MAX_ALIGNMENT
            or alignment & (alignment - 1)):
        raise CheckpointError(f"{f.path}: general.alignment must be a power of two up to {MAX_ALIGNMENT}")
    table = [_tensor(c) for _ in range(n_tensors)]
    data = -(-c.pos // alignment) * alignment
    for name, kind_id, shape, offset in table:
        where = f"{f.path}: tensor {shown(name)}"
        if name in header.tensors:
            raise CheckpointError(f"{where} appears twice")
        try:
            kind = ggml_type(kind_id, name[:80])
        except UnsupportedQuantType as e:
            raise CheckpointError(f"{f.path}: {e}") from None
        if shape[-1] % kind.block_size:
            raise CheckpointError(f"{where}: rows of {shape[-1]} values are not whole {kind.name} blocks "
                                  f"of {kind.block_size}")
        if offset % alignment:
            raise CheckpointError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
        info = GGUFTensorInfo(name, kind, shape, data + offset, kind.nbytes(shape))
        if info.end > f.size:
            raise CheckpointError(f"{where}: truncated: the tensor needs bytes [{info.start}, {info.end}) "
                                  f"but the file has {f.size} bytes")
        header.tensors[name] = info
    return header
