"""A GGUF file: header and tensor table parsed once with gguf-py's GGUFReader, tensor bytes read with pread.

GGUFReader memory-maps the file to parse the header; moepage copies the metadata and the tensor table out
of it and drops the map, so tensor bytes are only ever read with os.pread (the OS page cache is not the
model's cache). Tensor shapes are in torch order: GGUF dims ne = [C, R, E] become (E, R, C).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from moepage.kernels.ggml import GGMLType, QuantizedTensor, UnsupportedQuantType, ggml_type
from moepage.paging.pread import CheckpointError, PreadFile

GGUF_MAGIC = b"GGUF"


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


def _field_value(field):
    """A GGUFReader field -> plain Python value (str, int, float, bool, or a list of them)."""
    from gguf import GGUFValueType

    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if len(field.data) == 0:
            return []
        # Scalar arrays: one part per element; concatenate for speed on 150k-entry lists (scores, types).
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return field.parts[-1].tolist()[0]


class GGUFFile(PreadFile):
    def __init__(self, path: str, drop_page_cache: bool = False):
        super().__init__(path, drop_page_cache, "GGUF file")
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8 or head[:4] != GGUF_MAGIC:
            self.close()
            raise CheckpointError(f"{self.path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
        self.version = struct.unpack("<I", head[4:8])[0]
        self.metadata, self.tensors = self._parse()

    def _parse(self) -> tuple[dict, dict[str, GGUFTensorInfo]]:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(self.path, "r")
        except Exception as e:  # the reader raises ValueError/IndexError/KeyError on malformed headers
            raise CheckpointError(f"{self.path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
        try:
            fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
            metadata = {name: _field_value(f) for name, f in fields.items()}
            # (value type, array element type or None) per key, to write the metadata back (split)
            self.field_types = {name: (int(f.types[0]), int(f.types[-1]) if len(f.types) > 1 else None)
                                for name, f in fields.items()}
            tensors = {}
            for t in reader.tensors:
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                try:
                    kind = ggml_type(int(t.tensor_type), t.name)
                except UnsupportedQuantType as e:
                    raise CheckpointError(f"{self.path}: {e}") from None
                info = GGUFTensorInfo(t.name, kind, shape, int(t.data_offset), kind.nbytes(shape))
                if info.end > self.size:
                    raise CheckpointError(
                        f"{self.path}: truncated: tensor {t.name!r} needs bytes [{info.start}, {info.end}) "
                        f"but the file has {self.size} bytes"
                    )
                tensors[t.name] = info
        finally:
            mm = getattr(reader.data, "_mmap", None)
            del reader
            if mm is not None:
                try:
                    mm.close()
                except (BufferError, ValueError):
                    pass  # a view still exists; it goes when garbage collected
        return metadata, tensors

    # ---- metadata ---------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path}: GGUF metadata has no general.architecture")
        return arch

    def info(self, name: str, what: str = "tensor") -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} ({what}) is missing from the GGUF file") from None

    # ---- bytes ------------------------------------------------------------------------------------
    def read_quantized(self, name: str, what: str = "tensor") -> QuantizedTensor:
        info = self.info(name, what)
        raw = self.read_span(info.start, info.end)
        return QuantizedTensor(raw, info.type, info.shape, name)

    def read_slice(self, name: str, index: int, what: str = "tensor") -> QuantizedTensor:
        """Sub-tensor `index` of the outermost dimension (one expert of a [E, R, C] tensor): one pread."""
        info = self.info(name, what)
        outer, inner = info.shape[0], info.shape[1:]
        if not 0 <= index < outer:
            raise CheckpointError(f"{self.path}: index {index} out of range for tensor {name!r} of shape {info.shape}")
        each = info.nbytes // outer
        raw = self.read_span(info.start + index * each, info.start + (index + 1) * each)
        return QuantizedTensor(raw, info.type, inner, f"{name}[{index}]")

    def read(self, name: str, dtype: torch.dtype | None = None, what: str = "tensor") -> torch.Tensor:
        """Dequantized tensor; float types keep their dtype unless `dtype` is given, quantized ones are float32."""
        q = self.read_quantized(name, what)
        if dtype is None:
            dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(q.type.name, torch.float32)
        try:
            return q.dequantize(dtype)
        except (UnsupportedQuantType, ValueError) as e:
            raise CheckpointError(f"{self.path}: {e}") from None
