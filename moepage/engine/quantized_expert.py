"""Experts that stay GGML-quantized in the expert cache, and the choice of loader for the cache.

A QuantizedExpert holds the stored bytes of gate, up and down (its `nbytes` is the quantized size, which is
what the byte budget counts) and dequantizes one expert just in time when tokens are routed to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moepage.engine.model_args import ModelArgs
from moepage.engine.moe import PreparedExpert, prepare_expert
from moepage.kernels.ggml import QuantizedTensor, interleaved_for_matvec
from moepage.kernels.ggml_experts import swiglu_quantized
from moepage.paging.pread import aligned_bytes
from moepage.paging.sources import ExpertSource


@dataclass
class QuantizedExpert:
    """gate [I, H], up [I, H], down [H, I] as GGML bytes; compute() runs the SwiGLU FFN in x's dtype."""

    gate: QuantizedTensor
    up: QuantizedTensor
    down: QuantizedTensor
    stored_nbytes: int

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, H] -> [t, H]."""
        return swiglu_quantized(x, self.gate, self.up, self.down)


def prepare_quantized_expert(w, device) -> QuantizedExpert:
    """QuantizedExpertWeights (paging.gguf_experts, a fresh read) -> QuantizedExpert on `device`, each matrix in
    ggml's interleaved layout where this CPU multiplies it faster (in place; the same bytes)."""
    gate, up, down = (interleaved_for_matvec(t.to(device)) for t in (w.gate, w.up, w.down))
    return QuantizedExpert(gate, up, down, w.nbytes)


ExpertLoad = Callable[[int, int], object]


def expert_loader(source: ExpertSource, args: ModelArgs, dtype: torch.dtype, device
                  ) -> tuple[ExpertLoad, Callable[[int], int], int]:
    """(load(layer, expert), nbytes_of(layer), largest expert's bytes) for the ExpertCache.

    Quantized sources keep experts quantized (bytes = stored bytes); everything else is converted to `dtype`.
    """
    if getattr(source, "quantized", False):
        sizes = {layer: source.stored_nbytes(layer) for layer in args.moe_layers}
        return (lambda layer, e: prepare_quantized_expert(source.read_quantized(layer, e), device),
                lambda layer: sizes[layer], max(sizes.values()))
    each = PreparedExpert.nbytes_for(args.hidden_size, args.moe_intermediate_size, dtype)

    slots = source.reads_into  # False once a read's weights did not stay in their slot (a cast, another device)

    def load(layer: int, e: int, buffer: torch.Tensor | None = None) -> PreparedExpert:
        """buffer: an evicted expert's slot to reuse (the cache passes one when it has one)."""
        nonlocal slots
        if buffer is None and slots:
            buffer = aligned_bytes(each)
        prepared = prepare_expert(source.read(layer, e, into=buffer), dtype, device, buffer)
        if buffer is not None and prepared.buffer is None:
            slots = False
        return prepared

    return load, (lambda layer: each), each
