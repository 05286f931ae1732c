"""Routed experts with a GELU-tanh gated FFN (Gemma 4: `down(gelu_tanh(gate x) * up x)`, transformers'
Gemma4TextExperts), held as float w13 / w2 (from safetensors or a split directory) or as the GGML bytes of a GGUF,
and the ExpertCache loader for them (ModelArgs.expert_activation "gelu_tanh").

Shape legend: t tokens routed to this expert, H hidden, I expert intermediate size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from moepage.engine.model_args import ModelArgs
from moepage.engine.moe import PreparedExpert, prepare_expert
from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.ggml import QuantizedTensor
from moepage.kernels.ggml_linear import ggml_linear
from moepage.paging.sources import ExpertSource


@dataclass
class GeluExpert:
    """w13 [2I, H] (gate rows, then up rows), w2 [H, I] in the compute dtype."""

    w13: torch.Tensor
    w2: torch.Tensor
    stored_nbytes: int

    @property
    def nbytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, H] -> [t, H]."""
        gate, up = linear(x, self.w13).chunk(2, dim=-1)  # [t, I] each
        return linear(F.gelu(gate, approximate="tanh") * up, self.w2)


@dataclass
class GeluQuantizedExpert:
    """gate [I, H], up [I, H], down [H, I] as GGML bytes, multiplied by ggml's kernels as llama.cpp does."""

    w_gate: QuantizedTensor
    w_up: QuantizedTensor
    w_down: QuantizedTensor
    stored_nbytes: int

    @property
    def nbytes(self) -> int:
        return self.w_gate.nbytes + self.w_up.nbytes + self.w_down.nbytes

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        gate = ggml_linear(x, self.w_gate)
        return ggml_linear(F.gelu(gate, approximate="tanh") * ggml_linear(x, self.w_up), self.w_down)


def gelu_expert_loader(source: ExpertSource, args: ModelArgs, dtype: torch.dtype, device
                       ) -> tuple[Callable, Callable[[int], int], int]:
    """(load(layer, expert), nbytes_of(layer), largest expert's bytes) for the ExpertCache."""
    if getattr(source, "quantized", False) or hasattr(source, "read_quantized"):
        sizes = {layer: source.stored_nbytes(layer) for layer in args.moe_layers}

        def load_quantized(layer: int, e: int, buffer=None) -> GeluQuantizedExpert:
            w = source.read_quantized(layer, e)
            return GeluQuantizedExpert(w.gate.to(device), w.up.to(device), w.down.to(device), w.nbytes)

        return load_quantized, (lambda layer: sizes[layer]), max(sizes.values())
    each = PreparedExpert.nbytes_for(args.hidden_size, args.moe_intermediate_size, dtype)

    def load(layer: int, e: int, buffer=None) -> GeluExpert:
        p = prepare_expert(source.read(layer, e), dtype, device)
        return GeluExpert(p.w13, p.w2, p.stored_nbytes)

    return load, (lambda layer: each), each
