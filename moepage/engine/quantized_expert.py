"""Experts that stay GGML-quantized in the expert cache, and the choice of loader for the cache.

A QuantizedExpert holds the stored bytes of gate, up and down (its `nbytes` is the quantized size, which is
what the byte budget counts) and dequantizes one expert just in time when tokens are routed to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moepage.engine.gpt_oss_expert import ClampedSwiGLU, fused_expert_loader, gguf_expert_loader
from moepage.engine.model_args import ModelArgs
from moepage.engine.moe import PreparedExpert, prepare_expert
from moepage.kernels.ggml import QuantizedTensor, interleaved_for_matvec
from moepage.kernels.ggml_experts import swiglu_quantized
from moepage.paging.pread import aligned_bytes
from moepage.engine.fp8_expert import fp8_expert_loader
from moepage.paging.fp8_experts import FP8_SOURCES
from moepage.paging.fused_experts import FusedExpertSource
from moepage.paging.gguf_biased_experts import BiasedGGUFExpertSource
from moepage.paging.sources import ExpertSource


@dataclass
class QuantizedExpert:
    """gate [I, H], up [I, H], down [H, I] as GGML bytes; compute() runs the SwiGLU FFN in x's dtype."""

    gate: QuantizedTensor
    up: QuantizedTensor
    down: QuantizedTensor
    stored_nbytes: int
    buffer: torch.Tensor | None = None  # the slot the three parts live in (the cache reuses it after eviction)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() if self.buffer is not None else self.gate.nbytes + self.up.nbytes + self.down.nbytes

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, H] -> [t, H]."""
        return swiglu_quantized(x, self.gate, self.up, self.down)


def prepare_quantized_expert(w, device, buffer: torch.Tensor | None = None) -> QuantizedExpert:
    """QuantizedExpertWeights (paging.gguf_experts, a fresh read; into `buffer` when given) -> QuantizedExpert on
    `device`, each matrix in ggml's interleaved layout where this CPU multiplies it faster (in place; the same
    bytes)."""
    gate, up, down = (interleaved_for_matvec(t.to(device)) for t in (w.gate, w.up, w.down))
    on_cpu = device is None or torch.device(device).type == "cpu"
    return QuantizedExpert(gate, up, down, w.nbytes, buffer if on_cpu else None)


ExpertLoad = Callable[[int, int], object]


def expert_loader(source: ExpertSource, args: ModelArgs, dtype: torch.dtype, device
                  ) -> tuple[ExpertLoad, Callable[[int], int], int]:
    """(load(layer, expert), nbytes_of(layer), largest expert's bytes) for the ExpertCache.

    Quantized sources keep experts quantized (bytes = stored bytes); everything else is converted to `dtype`.
    Fused gpt-oss experts (paging/fused_experts.py) are held as stored (MXFP4 stays MXFP4).
    """
    if args.expert_activation == "gelu_tanh":  # Gemma 4 (engine/gelu_expert.py)
        from moepage.engine.gelu_expert import gelu_expert_loader

        return gelu_expert_loader(source, args, dtype, device)
    if isinstance(source, FP8_SOURCES):  # FP8 checkpoints: held as their FP8 bytes (engine/fp8_expert.py)
        return fp8_expert_loader(source, args.moe_layers, device)
    if isinstance(source, FusedExpertSource):
        return fused_expert_loader(source, args.moe_layers, ClampedSwiGLU(args.swiglu_alpha, args.swiglu_limit),
                                   dtype, device)
    if isinstance(source, BiasedGGUFExpertSource):
        return gguf_expert_loader(source, args.moe_layers, ClampedSwiGLU(args.swiglu_alpha, args.swiglu_limit))
    if getattr(source, "quantized", False):
        if hasattr(source, "slot_nbytes"):  # one slot size for every layer: parts read into it, slots recycled
            slot = source.slot_nbytes()

            def load_slot(layer: int, e: int, buffer: torch.Tensor | None = None) -> QuantizedExpert:
                buffer = aligned_bytes(slot) if buffer is None else buffer
                return prepare_quantized_expert(source.read_quantized(layer, e, into=buffer), device, buffer)

            return load_slot, (lambda layer: slot), slot
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
