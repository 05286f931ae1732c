"""Routed experts paged out of GGUF tensors: each expert is one contiguous byte range of
`blk.N.ffn_{gate,up,down}_exps.weight` (in a .gguf file) or one per-expert shard of a GGUF split directory.

Shape legend: E experts, I expert intermediate size, H hidden size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from moepage.kernels.ggml import QuantizedTensor, can_compute, is_quantized, unsupported
from moepage.paging.gguf_file import GGUFFile
from moepage.paging.pread import ALIGN, span_bytes
from moepage.paging.safetensors_file import CheckpointError, SafetensorsFile
from moepage.paging.sources import (
    ExpertSource, ExpertWeights, ShardFiles, Shapes, check_shape, check_unchanged, paging_in,
)

PARTS = ("gate", "up", "down")


@dataclass
class QuantizedExpertWeights:
    """One routed expert as stored: gate [I, H], up [I, H], down [H, I], each a QuantizedTensor."""

    gate: QuantizedTensor
    up: QuantizedTensor
    down: QuantizedTensor

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    @property
    def quantized(self) -> bool:
        return any(is_quantized(t.type) for t in (self.gate, self.up, self.down))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> ExpertWeights:
        return ExpertWeights(self.gate.dequantize(dtype), self.up.dequantize(dtype), self.down.dequantize(dtype))


class QuantizedExpertSource(ExpertSource):
    """An ExpertSource whose experts may be GGML-quantized: `read_quantized` returns the stored bytes,
    `read` the float32 values (for tools that want numbers)."""

    quantized: bool = False  # True when any expert tensor is a block-quantized type

    def read_quantized(self, layer: int, expert: int) -> QuantizedExpertWeights:
        raise NotImplementedError

    def read(self, layer: int, expert: int, into: torch.Tensor | None = None) -> ExpertWeights:
        q = self.read_quantized(layer, expert)  # into: unused (reads_into is False)
        with paging_in(layer, expert):
            try:
                return q.dequantize(torch.float32)
            except ValueError as e:
                raise CheckpointError(f"{self.describe()}: layer {layer} expert {expert}: {e}") from None

    def stored_nbytes(self, layer: int) -> int:
        raise NotImplementedError


def check_expert_types(gguf: GGUFFile, table: dict[str, str], layers: list[int], parts) -> bool:
    """Every expert tensor's GGML type checked now (one ggml computes, or a CheckpointError naming the tensor);
    True when any of them is quantized."""
    quantized = False
    for layer in layers:
        for p in parts:
            name = table[p].format(L=layer)
            kind = gguf.info(name, f"layer {layer} experts {p}").type
            if not can_compute(kind):
                raise CheckpointError(f"{gguf.path}: {unsupported(kind, name)}")
            quantized = quantized or is_quantized(kind)
    return quantized


class GGUFExpertSource(QuantizedExpertSource):
    """Experts of a .gguf file: expert e of layer L is slice e of the three [E, ., .] tensors (one pread each)."""

    def __init__(self, gguf: GGUFFile, table: dict[str, str], moe_layers: list[int]):
        self.file = gguf
        self.table = table  # part -> "blk.{L}.ffn_gate_exps.weight"
        self.moe_layers = moe_layers
        self.quantized = check_expert_types(gguf, table, moe_layers, PARTS)

    def expect(self, shapes: Shapes, layers: list[int], num_experts: int):
        """Each [E, ., .] expert tensor checked now: E experts of the implied shape."""
        super().expect(shapes, layers, num_experts)
        for layer in layers:
            for p in PARTS:
                name = self.table[p].format(L=layer)
                check_shape(self.file.path, name, self.file.info(name).shape, (num_experts, *shapes[p]),
                            f"layer {layer} experts {p}")

    def read_quantized(self, layer: int, expert: int, into: torch.Tensor | None = None) -> QuantizedExpertWeights:
        """into: an ALIGN-aligned uint8 slot of at least slot_nbytes() bytes (an evicted expert's, reused: no
        fresh pages to fault in); the three parts are read into it one after another, each at an aligned offset."""
        with paging_in(layer, expert):
            check_unchanged(self.file, f"layer {layer} expert {expert}")
            if into is not None and into.numel() < self.slot_nbytes():
                raise ValueError(f"expert slot of {into.numel()} bytes < {self.slot_nbytes()}")
            parts, at = {}, 0
            for p in PARTS:
                name = self.table[p].format(L=layer)
                view = None
                if into is not None:
                    info = self.file.info(name)
                    each = info.nbytes // info.shape[0]
                    span = span_bytes(info.start + expert * each, info.start + (expert + 1) * each)
                    view, at = into[at : at + span], at + span
                parts[p] = self.file.read_slice(name, expert, f"layer {layer} expert {expert} {p}", into=view)
            return QuantizedExpertWeights(**parts)

    def slot_nbytes(self) -> int:
        """Bytes of one expert slot that any layer's expert fits in with its parts read aligned: the same for
        every layer, so an evicted expert's slot always takes the next read."""
        if not hasattr(self, "_slot"):
            worst = 0
            for layer in self.moe_layers:
                total = 0
                for p in PARTS:
                    info = self.file.info(self.table[p].format(L=layer), "expert")
                    each = info.nbytes // info.shape[0]
                    total += -(-each // ALIGN) * ALIGN + ALIGN  # widened to ALIGN at both ends, at worst
                worst = max(worst, total)
            self._slot = worst
        return self._slot

    def stored_nbytes(self, layer: int) -> int:
        total = 0
        for p in PARTS:
            info = self.file.info(self.table[p].format(L=layer), "expert")
            total += info.nbytes // info.shape[0]
        return total

    def describe(self) -> str:
        return f"GGUF {os.path.basename(self.file.path)}"


# ---- split directories --------------------------------------------------------------------------------
def shard_metadata(q: QuantizedExpertWeights) -> dict[str, str]:
    """safetensors __metadata__ describing the GGML type and logical shape of each part."""
    meta = {"format": "moepage-gguf-expert"}
    for p in PARTS:
        t: QuantizedTensor = getattr(q, p)
        meta[f"{p}.type"] = t.type.name
        meta[f"{p}.shape"] = ",".join(str(s) for s in t.shape)
    return meta


class GGUFSplitExpertSource(QuantizedExpertSource):
    """A GGUF split directory: one safetensors file per expert holding the raw GGML bytes of gate, up and down
    as uint8 tensors; their types and shapes are in the file's metadata. sha256 checked at first page-in."""

    def __init__(self, root: str, shard_path: Callable[[int, int], str], hashes: dict[str, str],
                 moe_layers: list[int], drop_page_cache: bool = True, verify: bool = True):
        self.root = root
        self.shards = ShardFiles(root, shard_path, hashes, drop_page_cache, verify)
        self.quantized = any(self._read(L, 0).quantized for L in moe_layers[:1])

    def _open(self, layer: int, expert: int) -> SafetensorsFile:
        return self.shards.open(layer, expert)

    def _read(self, layer: int, expert: int) -> QuantizedExpertWeights:
        from moepage.kernels.ggml import ggml_type

        f = self._open(layer, expert)
        try:
            parts = {}
            for p in PARTS:
                try:
                    kind = ggml_type(f.metadata[f"{p}.type"], p)
                    shape = tuple(int(s) for s in f.metadata[f"{p}.shape"].split(","))
                except (KeyError, ValueError):
                    raise CheckpointError(f"{f.path}: GGUF expert shard metadata for {p!r} is missing or bad") from None
                if self.expected is not None:
                    check_shape(f.path, p, shape, self.expected[p], f"layer {layer} expert {expert} {p}")
                if p not in f.tensors:
                    raise CheckpointError(f"{f.path}: tensor {p!r} (layer {layer} expert {expert}) is missing")
                if (any(d < 0 for d in shape) or shape[-1] % kind.block_size
                        or f.tensors[p].nbytes != kind.nbytes(shape)):  # checked before reading
                    raise CheckpointError(f"{f.path}: tensor {p!r} has {f.tensors[p].nbytes} bytes, which is not "
                                          f"{kind.name} of shape {list(shape)}")
                raw = f.read(p).reshape(-1)
                parts[p] = QuantizedTensor(raw, kind, shape, f"layer {layer} expert {expert} {p}")
            return QuantizedExpertWeights(**parts)
        finally:
            f.close()

    def read_quantized(self, layer: int, expert: int) -> QuantizedExpertWeights:
        with paging_in(layer, expert):
            return self._read(layer, expert)

    def stored_nbytes(self, layer: int) -> int:
        return self.shards.expert_nbytes(layer)

    def describe(self) -> str:
        return f"GGUF split shards in {self.root}"
