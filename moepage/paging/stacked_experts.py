"""Routed experts stacked one tensor per layer in transformers v5's own orientation (Gemma 4's published layout),
paged one expert at a time: expert e is the e-th contiguous slice of each tensor, one pread each.

Per layer L, under the family's prefix (Gemma 4: `model.language_model.layers.{L}.experts.`):
    gate_up_proj [E, 2I, H]  (gate rows, then up rows: transformers' chunk(2))
    down_proj    [E, H, I]
A `moepage split` directory holds each expert's two slices as [1, 2I, H] and [1, H, I] under the same names.

Shape legend: E experts, H hidden, I expert intermediate size.
"""
from __future__ import annotations

import torch

from moepage.paging.safetensors_file import CheckpointError
from moepage.paging.sources import (
    ExpertSource, ExpertWeights, Shapes, ShardFiles, TensorIndex, check_shape, check_unchanged, paging_in,
)

PARTS = ("gate_up_proj", "down_proj")


class StackedExpertSource(ExpertSource):
    def __init__(self, index: TensorIndex, prefix: str):
        self.index = index
        self.prefix = prefix
        self.shards: ShardFiles | None = None  # a `moepage split` directory: expert e of layer L is its own file

    def in_shards(self, shards: ShardFiles, layers: list[int]) -> "StackedExpertSource":
        """The same experts from a split directory: index becomes the layers' expert-0 shards (names, shapes, bytes
        per expert) and each read opens its expert's file."""
        self.shards = shards
        self.index = TensorIndex([shards.open(layer, 0) for layer in layers])
        return self

    def parts(self, layer: int) -> dict[str, str]:
        return {p: self.prefix.format(L=layer) + p for p in PARTS}

    def expect(self, shapes: Shapes, layers: list[int], num_experts: int):
        """Every stacked tensor's header entry checked now: present, floating point, of the implied shape."""
        super().expect(shapes, layers, num_experts)
        (I, H), E = shapes["gate"], (1 if self.shards is not None else num_experts)
        want = {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}
        for layer in layers:
            for part, n in self.parts(layer).items():
                f = self.index.file_of(n, f"layer {layer} experts {part}")
                info = f.tensors[n]
                check_shape(f.path, n, info.shape, want[part], f"layer {layer} experts {part}")
                if not info.dtype.is_floating_point:
                    raise CheckpointError(f"{f.path}: tensor {n!r} is {info.dtype}, not floating point")

    def _slice(self, index: TensorIndex, name: str, expert: int, what: str) -> torch.Tensor:
        """Slice `expert` of a stacked [E, ...] tensor, one read."""
        f = index.file_of(name, what)
        info = f.tensors[name]
        E = info.shape[0]
        if not 0 <= expert < E:
            raise CheckpointError(f"{f.path}: {what}: expert {expert} is outside the {E} experts of {name!r}")
        per = info.nbytes // E
        span = f.read_span(info.start + expert * per, info.start + (expert + 1) * per)
        return span.view(info.dtype).view(info.shape[1:])

    def read(self, layer: int, expert: int, into: torch.Tensor | None = None) -> ExpertWeights:
        """gate [I, H] and up [I, H] (back to back in one read: the expert's w13 without a copy), down [H, I]."""
        with paging_in(layer, expert):
            what = f"layer {layer} expert {expert}"
            shard = None if self.shards is None else self.shards.open(layer, expert)
            index, at = (self.index, expert) if shard is None else (TensorIndex([shard]), 0)
            try:
                parts = self.parts(layer)
                for f in {id(f): f for f in (index.file_of(n, what) for n in parts.values())}.values():
                    check_unchanged(f, what)
                gate_up = self._slice(index, parts["gate_up_proj"], at, f"{what} gate_up_proj")  # [2I, H]
                down = self._slice(index, parts["down_proj"], at, f"{what} down_proj")  # [H, I]
            finally:
                if shard is not None:
                    shard.close()
            gate, up = gate_up.chunk(2, dim=0)
            return ExpertWeights(gate, up, down)

    def stored_nbytes(self, layer: int) -> int:
        total = 0
        for n in self.parts(layer).values():
            info = self.index.info(n, f"layer {layer} experts")
            total += info.nbytes // info.shape[0]
        return total

    def slices(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Both stored parts of one expert as [1, ...] under their stacked tensor's name (what `moepage split`
        writes)."""
        with paging_in(layer, expert):
            what = f"layer {layer} expert {expert}"
            return {n: self._slice(self.index, n, expert, f"{what} {p}").unsqueeze(0)
                    for p, n in self.parts(layer).items()}

    def describe(self) -> str:
        if self.shards is not None:
            return f"split shards in {self.shards.root}, stacked experts"
        return f"safetensors, stacked experts ({len(self.index.files)} files)"
