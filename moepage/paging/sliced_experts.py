"""Routed experts stored one tensor per layer and part, every expert stacked along the first dimension [E, ...]
(gpt-oss's fused layout, Gemma 4's stacked one), paged one expert at a time: expert e is the e-th contiguous slice of
each tensor, one pread each. A `moepage split` directory holds each expert's slices as [1, ...] under the same
names, one shard per expert. Subclasses name their parts and build an expert from them.

Shape legend: E experts.
"""
from __future__ import annotations

import torch

from moepage.paging.safetensors_file import CheckpointError
from moepage.paging.sources import ExpertSource, ShardFiles, TensorIndex, check_unchanged, paging_in


class SlicedExpertSource(ExpertSource):
    kind = "sliced"  # the layout's name in describe()

    def __init__(self, index: TensorIndex, prefix: str):
        self.index = index
        self.prefix = prefix
        self.shards: ShardFiles | None = None  # a `moepage split` directory: expert e of layer L is its own file

    def parts(self, layer: int) -> dict[str, str]:
        """part -> tensor name of this layer's stacked tensors."""
        raise NotImplementedError

    def name(self, layer: int, part: str) -> str:
        return self.prefix.format(L=layer) + part

    def in_shards(self, shards: ShardFiles, layers: list[int]) -> SlicedExpertSource:
        """The same experts from a split directory: index becomes the layers' expert-0 shards (names, kinds, bytes
        per expert) and each read opens its expert's file."""
        self.shards = shards
        self.index = TensorIndex([shards.open(layer, 0) for layer in layers])
        return self

    def experts_per_tensor(self, num_experts: int) -> int:
        """The first dimension each stored tensor has: E, or 1 in a split directory's shards."""
        return 1 if self.shards is not None else num_experts

    @staticmethod
    def _slice(index: TensorIndex, name: str, expert: int, what: str) -> torch.Tensor:
        """Slice `expert` of a stacked [E, ...] tensor, one read."""
        f = index.file_of(name, what)
        info = f.tensors[name]
        E = info.shape[0]
        if not 0 <= expert < E:
            raise CheckpointError(f"{f.path}: {what}: expert {expert} is outside the {E} experts of {name!r}")
        per = info.nbytes // E
        span = f.read_span(info.start + expert * per, info.start + (expert + 1) * per)
        return span.view(info.dtype).view(info.shape[1:])

    def read_parts(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """{part: the expert's slice} (call inside paging_in), from the checkpoint or the expert's own shard."""
        what = f"layer {layer} expert {expert}"
        shard = None if self.shards is None else self.shards.open(layer, expert)
        index, at = (self.index, expert) if shard is None else (TensorIndex([shard]), 0)
        try:
            parts = self.parts(layer)
            for f in {id(f): f for f in (index.file_of(n, what) for n in parts.values())}.values():
                check_unchanged(f, what)
            return {p: self._slice(index, n, at, f"{what} {p}") for p, n in parts.items()}
        finally:
            if shard is not None:
                shard.close()

    def stored_nbytes(self, layer: int) -> int:
        total = 0
        for n in self.parts(layer).values():
            info = self.index.info(n, f"layer {layer} experts")
            total += info.nbytes // info.shape[0]
        return total

    def slices(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Every stored part of one expert as [1, ...] under its stacked tensor's name (what `moepage split` writes)."""
        with paging_in(layer, expert):
            what = f"layer {layer} expert {expert}"
            return {n: self._slice(self.index, n, expert, f"{what} {p}").unsqueeze(0)
                    for p, n in self.parts(layer).items()}

    def describe(self) -> str:
        if self.shards is not None:
            return f"split shards in {self.shards.root}, {self.kind} experts"
        return f"safetensors, {self.kind} experts ({len(self.index.files)} files)"
