"""Routed experts stored fused, one tensor per layer holding every expert (gpt-oss's published layout), paged one
expert at a time: expert e is the e-th contiguous slice of each tensor, one pread each.

Per layer L, under `model.layers.{L}.mlp.experts.`:
- float (bf16 / fp32): gate_up_proj [E, H, 2I] (gate and up interleaved along 2I), down_proj [E, I, H];
- MXFP4 (the published gpt-oss checkpoints): gate_up_proj_blocks [E, 2I, H/32, 16] + gate_up_proj_scales
  [E, 2I, H/32], down_proj_blocks [E, H, I/32, 16] + down_proj_scales [E, H, I/32] (kernels/mxfp4.py);
- and always gate_up_proj_bias [E, 2I], down_proj_bias [E, H].
MXFP4 experts stay MXFP4 (4.25 bits a weight) from disk to the matvec; their bytes are what the budget counts.

Shape legend: E experts, H hidden, I expert intermediate size, G blocks of 32 values per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moepage.kernels.mxfp4 import BLOCK, Mxfp4Tensor
from moepage.paging.safetensors_file import CheckpointError
from moepage.paging.sliced_experts import SlicedExpertSource
from moepage.paging.sources import ExpertWeights, Shapes, ShardFiles, TensorIndex, check_shape, paging_in

PREFIX = "model.layers.{L}.mlp.experts."


@dataclass
class FusedExpertWeights:
    """One expert as stored: gate_up float [H, 2I] (the published orientation) or MXFP4 [2I, H]; down float [I, H]
    or MXFP4 [H, I]; gate_up_bias [2I], down_bias [H]."""

    gate_up: torch.Tensor | Mxfp4Tensor
    gate_up_bias: torch.Tensor
    down_proj: torch.Tensor | Mxfp4Tensor
    down_bias: torch.Tensor

    @property
    def nbytes(self) -> int:
        def size(t):
            return t.nbytes if isinstance(t, Mxfp4Tensor) else t.numel() * t.element_size()
        return sum(size(t) for t in (self.gate_up, self.gate_up_bias, self.down_proj, self.down_bias))

    @property
    def mxfp4(self) -> bool:
        return isinstance(self.gate_up, Mxfp4Tensor)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) as float32, rows in the stored order (gate and up interleaved)."""
        if self.mxfp4:
            return self.gate_up.dequantize(), self.down_proj.dequantize()
        return self.gate_up.float().T, self.down_proj.float().T


class FusedExpertSource(SlicedExpertSource):
    """Experts of an HF checkpoint in the fused layout above; `read_fused` gives the stored form (what the cache
    holds), `read` the canonical gate/up/down as float32 (for tools; the biases are not part of it)."""

    kind = "fused"

    def __init__(self, index: TensorIndex, prefix: str = PREFIX):
        super().__init__(index, prefix)
        self._mxfp4: dict[int, bool] = {}

    def in_shards(self, shards: ShardFiles, layers: list[int]) -> FusedExpertSource:
        super().in_shards(shards, layers)
        self._mxfp4.clear()
        return self

    def is_mxfp4(self, layer: int) -> bool:
        if layer not in self._mxfp4:
            self._mxfp4[layer] = self.index.has(self.name(layer, "gate_up_proj_blocks"))
        return self._mxfp4[layer]

    def parts(self, layer: int) -> dict[str, str]:
        """part -> tensor name of this layer's fused expert tensors."""
        parts = ["gate_up_proj_bias", "down_proj_bias"]
        if self.is_mxfp4(layer):
            parts += ["gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"]
        else:
            parts += ["gate_up_proj", "down_proj"]
        return {p: self.name(layer, p) for p in parts}

    def expect(self, shapes: Shapes, layers: list[int], num_experts: int):
        """Every fused tensor's header entry checked now: present, of the implied shape and kind."""
        super().expect(shapes, layers, num_experts)
        (I, H), E = shapes["gate"], self.experts_per_tensor(num_experts)
        if H % BLOCK or I % BLOCK:
            mx = [layer for layer in layers if self.is_mxfp4(layer)]
            if mx:
                raise CheckpointError(f"layer {mx[0]}: MXFP4 experts need hidden and expert sizes that are multiples "
                                      f"of {BLOCK} (got {H} and {I})")
        want = {"gate_up_proj_bias": (E, 2 * I), "down_proj_bias": (E, H),
                "gate_up_proj": (E, H, 2 * I), "down_proj": (E, I, H),
                "gate_up_proj_blocks": (E, 2 * I, H // BLOCK, 16), "gate_up_proj_scales": (E, 2 * I, H // BLOCK),
                "down_proj_blocks": (E, H, I // BLOCK, 16), "down_proj_scales": (E, H, I // BLOCK)}
        for layer in layers:
            for part, n in self.parts(layer).items():
                f = self.index.file_of(n, f"layer {layer} experts {part}")
                info = f.tensors[n]
                check_shape(f.path, n, info.shape, want[part], f"layer {layer} experts {part}")
                packed = part.endswith(("_blocks", "_scales"))
                if packed != (info.dtype == torch.uint8) or not (packed or info.dtype.is_floating_point):
                    raise CheckpointError(f"{f.path}: tensor {n!r} is {info.dtype}, not "
                                          f"{'uint8 MXFP4 bytes' if packed else 'floating point'}")

    def read_fused(self, layer: int, expert: int) -> FusedExpertWeights:
        with paging_in(layer, expert):
            what = f"layer {layer} expert {expert}"
            t = self.read_parts(layer, expert)
            if self.is_mxfp4(layer):
                two_i, g = t["gate_up_proj_scales"].shape
                h, gi = t["down_proj_scales"].shape
                gate_up = Mxfp4Tensor(t["gate_up_proj_blocks"], t["gate_up_proj_scales"], (two_i, g * BLOCK),
                                      f"{what} gate_up")
                down = Mxfp4Tensor(t["down_proj_blocks"], t["down_proj_scales"], (h, gi * BLOCK), f"{what} down")
            else:
                gate_up, down = t["gate_up_proj"], t["down_proj"]
            return FusedExpertWeights(gate_up, t["gate_up_proj_bias"], down, t["down_proj_bias"])

    def read(self, layer: int, expert: int, into: torch.Tensor | None = None) -> ExpertWeights:
        w = self.read_fused(layer, expert)
        gate_up, down = w.matrices()  # [2I, H], [H, I]
        return ExpertWeights(gate_up[0::2].contiguous(), gate_up[1::2].contiguous(), down.contiguous(),
                             read_nbytes=w.nbytes)
