"""Routed experts of a GGUF file whose gate and up projections are one fused tensor per layer (llama.cpp's
`blk.N.ffn_gate_up_exps.weight` [E, 2I, H]: gate rows, then up rows, as Gemma 4's converter writes them) with
`blk.N.ffn_down_exps.weight` [E, H, I]: expert e is slice e of each, one pread each, kept as stored (GGML bytes); its
gate and up are the two row halves of its gate_up slice (whole rows: whole GGML blocks).

Shape legend: E experts, I expert intermediate size, H hidden size.
"""
from __future__ import annotations

import os

from moepage.kernels.ggml import QuantizedTensor
from moepage.paging.gguf_experts import QuantizedExpertSource, QuantizedExpertWeights, check_expert_types
from moepage.paging.gguf_file import GGUFFile
from moepage.paging.sources import Shapes, check_shape, check_unchanged, paging_in

PARTS = ("gate_up", "down")


class GGUFStackedExpertSource(QuantizedExpertSource):
    def __init__(self, gguf: GGUFFile, table: dict[str, str], moe_layers: list[int]):
        self.file = gguf
        self.table = table  # gate_up | down -> "blk.{L}.ffn_gate_up_exps.weight" ...
        self.moe_layers = moe_layers
        self.quantized = check_expert_types(gguf, table, moe_layers, PARTS)

    def expect(self, shapes: Shapes, layers: list[int], num_experts: int):
        super().expect(shapes, layers, num_experts)
        (I, H) = shapes["gate"]
        want = {"gate_up": (num_experts, 2 * I, H), "down": (num_experts, *shapes["down"])}
        for layer in layers:
            for p in PARTS:
                name = self.table[p].format(L=layer)
                check_shape(self.file.path, name, self.file.info(name).shape, want[p], f"layer {layer} experts {p}")

    def read_quantized(self, layer: int, expert: int) -> QuantizedExpertWeights:
        with paging_in(layer, expert):
            what = f"layer {layer} expert {expert}"
            check_unchanged(self.file, what)
            gu = self.file.read_slice(self.table["gate_up"].format(L=layer), expert, f"{what} gate_up")
            down = self.file.read_slice(self.table["down"].format(L=layer), expert, f"{what} down")
            rows, cols = gu.shape
            half = gu.data.numel() // 2  # [2I rows] -> two [I rows] halves of the same bytes
            gate = QuantizedTensor(gu.data[:half], gu.type, (rows // 2, cols), f"{gu.name} gate")
            up = QuantizedTensor(gu.data[half:], gu.type, (rows // 2, cols), f"{gu.name} up")
            return QuantizedExpertWeights(gate, up, down)

    def stored_nbytes(self, layer: int) -> int:
        total = 0
        for p in PARTS:
            info = self.file.info(self.table[p].format(L=layer), "expert")
            total += info.nbytes // info.shape[0]
        return total

    def describe(self) -> str:
        return f"GGUF {os.path.basename(self.file.path)}, fused gate_up experts"
