"""A routed expert held as its FP8 bytes and block scales (paging/fp8_experts.py) in the expert cache, computed on
them by kernels/fp8.py: the SwiGLU FFN of transformers' experts on the weights its FP8 loader dequantizes.

    out = down(silu(gate(x)) * up(x)),  each projection an fp32 dot of the decoded weights rounded to x's dtype

Shape legend: t tokens routed to this expert, H hidden, I expert intermediate size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moepage.kernels import fp8
from moepage.paging.fp8_experts import Fp8ExpertWeights


@dataclass
class Fp8Expert:
    w: Fp8ExpertWeights
    stored_nbytes: int

    @property
    def nbytes(self) -> int:
        return self.w.nbytes  # what the budget counts: one byte a weight plus the float32 scales

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, H] -> [t, H] in x's dtype."""
        h = F.silu(fp8.linear(x, self.w.gate)) * fp8.linear(x, self.w.up)  # [t, I]
        return fp8.linear(h, self.w.down)


def fp8_expert_loader(source, layers: list[int], device):
    """(load(layer, expert), nbytes_of(layer), largest expert's bytes) for the ExpertCache; source: one of
    paging.fp8_experts.FP8_SOURCES (an FP8 checkpoint or its split)."""
    sizes = {layer: source.stored_nbytes(layer) for layer in layers}

    def load(layer: int, e: int, buffer=None) -> Fp8Expert:
        w = source.read(layer, e)
        if device is not None and torch.device(device).type != "cpu":
            w = Fp8ExpertWeights(w.gate.to(device), w.up.to(device), w.down.to(device))
        return Fp8Expert(w, w.nbytes)

    return load, (lambda layer: sizes[layer]), max(sizes.values())
