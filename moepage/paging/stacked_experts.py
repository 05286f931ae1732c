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
from moepage.paging.sliced_experts import SlicedExpertSource
from moepage.paging.sources import ExpertWeights, Shapes, check_shape, paging_in

PARTS = ("gate_up_proj", "down_proj")


class StackedExpertSource(SlicedExpertSource):
    kind = "stacked"

    def parts(self, layer: int) -> dict[str, str]:
        return {p: self.name(layer, p) for p in PARTS}

    def expect(self, shapes: Shapes, layers: list[int], num_experts: int):
        """Every stacked tensor's header entry checked now: present, floating point, of the implied shape."""
        super().expect(shapes, layers, num_experts)
        (I, H), E = shapes["gate"], self.experts_per_tensor(num_experts)
        want = {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}
        for layer in layers:
            for part, n in self.parts(layer).items():
                f = self.index.file_of(n, f"layer {layer} experts {part}")
                info = f.tensors[n]
                check_shape(f.path, n, info.shape, want[part], f"layer {layer} experts {part}")
                if not info.dtype.is_floating_point:
                    raise CheckpointError(f"{f.path}: tensor {n!r} is {info.dtype}, not floating point")

    def read(self, layer: int, expert: int, into: torch.Tensor | None = None) -> ExpertWeights:
        """gate [I, H] and up [I, H] (back to back in one read: the expert's w13 without a copy), down [H, I]."""
        with paging_in(layer, expert):
            t = self.read_parts(layer, expert)  # gate_up_proj [2I, H], down_proj [H, I]
            gate, up = t["gate_up_proj"].chunk(2, dim=0)
            return ExpertWeights(gate, up, t["down_proj"])
