"""A GGUF file: header and tensor table parsed once by our own bounded reader, tensor bytes read with pread.

Nothing is mapped: the header is read in bounded chunks (paging/gguf_header.py checks every count and offset
against the file before allocating), and tensor bytes only ever with os.pread (the OS page cache is not the
model's cache). Tensor shapes are in torch order: GGUF dims ne = [C, R, E] become (E, R, C).
"""
from __future__ import annotations

import torch

from moepage.kernels.ggml import QuantizedTensor, UnsupportedQuantType
from moepage.paging.gguf_header import GGUF_MAGIC, GGUFTensorInfo, parse_gguf_header
from moepage.paging.pread import CheckpointError, PreadFile

__all__ = ["GGUF_MAGIC", "GGUFFile", "GGUFTensorInfo"]


class GGUFFile(PreadFile):
    def __init__(self, path: str, drop_page_cache: bool = False):
        super().__init__(path, drop_page_cache, "GGUF file")
        try:
            header = parse_gguf_header(self)
        except CheckpointError:
            self.close()
            raise
        self.version = header.version
        self.metadata, self.tensors = header.metadata, header.tensors
        self.field_types = header.field_types  # key -> (value type, array element type or None): split writes them back

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

    def read_slice(self, name: str, index: int, what: str = "tensor", into: torch.Tensor | None = None
                   ) -> QuantizedTensor:
        """Sub-tensor `index` of the outermost dimension (one expert of a [E, R, C] tensor): one pread (into an
        aligned buffer of span_bytes when given)."""
        info = self.info(name, what)
        outer, inner = info.shape[0], info.shape[1:]
        if not 0 <= index < outer:
            raise CheckpointError(f"{self.path}: index {index} out of range for tensor {name!r} of shape {info.shape}")
        each = info.nbytes // outer
        raw = self.read_span(info.start + index * each, info.start + (index + 1) * each, into)
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
