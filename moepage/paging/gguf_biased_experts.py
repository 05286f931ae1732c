"""gpt-oss's routed experts in a GGUF file (llama.cpp's converter output): the quantized (MXFP4) gate, up and down
slices of `blk.N.ffn_{gate,up,down}_exps.weight`, each with its row of `blk.N.ffn_{gate,up,down}_exps.bias`; the
biases are read with the expert and counted in its bytes.

Shape legend: E experts, I expert intermediate size, H hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moepage.paging.gguf_experts import PARTS, GGUFExpertSource, QuantizedExpertWeights
from moepage.paging.safetensors_file import CheckpointError
from moepage.paging.sources import Shapes, check_shape, paging_in


@dataclass
class BiasedExpertWeights:
    """weights: gate [I, H], up [I, H], down [H, I] as stored; biases float32: gate [I], up [I], down [H]."""

    weights: QuantizedExpertWeights
    biases: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes + sum(b.numel() * b.element_size() for b in self.biases.values())


class BiasedGGUFExpertSource(GGUFExpertSource):
    def bias_name(self, layer: int, part: str) -> str:
        return self.table[part].format(L=layer).removesuffix(".weight") + ".bias"

    def expect(self, shapes: Shapes, layers: list[int], num_experts: int):
        super().expect(shapes, layers, num_experts)
        for layer in layers:
            for p in PARTS:
                name = self.bias_name(layer, p)
                info = self.file.info(name, f"layer {layer} expert {p} biases")
                check_shape(self.file.path, name, info.shape, (num_experts, shapes[p][0]), f"layer {layer} {p} bias")
                if info.type.name not in ("F32", "F16", "BF16"):
                    raise CheckpointError(f"{self.file.path}: tensor {name!r} is {info.type.name}, not a float type")

    def read_biased(self, layer: int, expert: int) -> BiasedExpertWeights:
        weights = self.read_quantized(layer, expert)
        with paging_in(layer, expert):
            biases = {p: self.file.read_slice(self.bias_name(layer, p), expert, f"layer {layer} expert {expert} "
                                              f"{p} bias").dequantize(torch.float32) for p in PARTS}
        return BiasedExpertWeights(weights, biases)

    def stored_nbytes(self, layer: int) -> int:
        total = super().stored_nbytes(layer)
        for p in PARTS:
            info = self.file.info(self.bias_name(layer, p), "expert bias")
            total += info.shape[1] * 4 if len(info.shape) == 2 else 0  # held as float32
        return total
