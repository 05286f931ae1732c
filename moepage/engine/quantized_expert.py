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
from moepage.kernels import ggml_gemm
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


def experts_prefill(cache, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                    order: list[int]) -> torch.Tensor | None:
    """A prompt chunk through one layer's routed quantized experts: x [T, H], indices / weights [T, K] the router's
    choice, order its experts ascending -> [T, H] in x's dtype, or None where the experts are not GGML-quantized
    (or ggml's kernels are absent): the caller then computes expert by expert.

    The experts go through csrc/ggml_gemm.cpp in batches of as many as half the cache holds (all of them when
    resident), each batch in one call; every token's weighted expert outputs are summed in float32 in ascending
    expert order across batches, so the result is the same bits at any budget, and (each row's products being the
    one-token kernels') row t's result is what the decode computes for token t alone."""
    if not getattr(cache.load, "ggml_swiglu", False) or x.device.type != "cpu" or x.dim() != 2 or not order \
            or ggml_gemm.backend() is None:
        return None
    room = max(1, cache.budget // max(1, cache.nbytes_of(layer)) // 2)
    acc = torch.zeros(x.shape, dtype=torch.float32)  # [T, H]
    for i in range(0, len(order), room):
        ids = order[i : i + room]
        keys = [(layer, e) for e in ids]
        held = cache.acquire_many(keys)
        try:
            types = ggml_gemm.fusable(held)
            if types is None and i == 0:
                return None
            if i + room < len(order):  # the next batch's reads run while this one computes
                cache.prefetch([(layer, e) for e in order[i + room : i + 2 * room]])
            if types is not None:
                ggml_gemm.experts_accumulate(acc, x, indices, weights, ids, held, types)
                continue
            for e, ex in zip(ids, held):  # a batch of other types (not seen in practice): same order, same sum
                tok, pos = (indices == e).nonzero(as_tuple=True)
                acc[tok] += weights[tok, pos, None].float() * ex.compute(x[tok]).float()
        finally:
            cache.release_many(keys)
    return acc.to(x.dtype)


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

            load_slot.ggml_swiglu = True  # experts_prefill takes what it loads
            return load_slot, (lambda layer: slot), slot
        sizes = {layer: source.stored_nbytes(layer) for layer in args.moe_layers}

        def load(layer: int, e: int) -> QuantizedExpert:
            return prepare_quantized_expert(source.read_quantized(layer, e), device)

        load.ggml_swiglu = True
        return load, (lambda layer: sizes[layer]), max(sizes.values())
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
