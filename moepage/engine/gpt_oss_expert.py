"""gpt-oss's routed expert: biased projections around a clamped SwiGLU, with gate and up interleaved in one matrix,
computed with the ops of transformers' GptOssExperts (the float layout) or on the MXFP4 bytes (kernels/mxfp4.py).

    gu = x @ gate_up + b;  gate = gu[:, 0::2].clamp(max=limit);  up = gu[:, 1::2].clamp(-limit, limit)
    out = ((up + 1) * gate * sigmoid(alpha * gate)) @ down + b_down

Shape legend: t tokens routed to this expert, H hidden, I expert intermediate size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moepage.kernels import mxfp4
from moepage.kernels.ggml_linear import ggml_linear
from moepage.paging.fused_experts import FusedExpertSource, FusedExpertWeights
from moepage.paging.gguf_biased_experts import BiasedExpertWeights, BiasedGGUFExpertSource


@dataclass(frozen=True)
class ClampedSwiGLU:
    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [t, 2I] (interleaved) -> [t, I]."""
        return self.gated(gate_up[..., ::2], gate_up[..., 1::2])

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up [t, I] -> [t, I]."""
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


@dataclass
class GptOssExpert:
    """One expert held as stored (FusedExpertWeights, on the compute device in the compute dtype where float)."""

    w: FusedExpertWeights
    act: ClampedSwiGLU
    stored_nbytes: int

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, H] -> [t, H] in x's dtype."""
        w = self.w
        if w.mxfp4:
            h = self.act(mxfp4.linear(x, w.gate_up, w.gate_up_bias))  # [t, I]
            return mxfp4.linear(h, w.down_proj, w.down_bias)
        h = self.act(x @ w.gate_up + w.gate_up_bias)  # [t, H] @ [H, 2I], as transformers multiplies
        return h @ w.down_proj + w.down_bias


@dataclass
class GptOssGGUFExpert:
    """One expert of a gpt-oss GGUF: gate, up, down GGML-quantized (MXFP4 as llama.cpp's converter writes them,
    multiplied by ggml's kernels, as llama.cpp does), biases float."""

    w: BiasedExpertWeights
    act: ClampedSwiGLU

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, H] -> [t, H] in x's dtype."""
        q, b = self.w.weights, self.w.biases
        gate = ggml_linear(x, q.gate) + b["gate"].to(x.dtype)
        up = ggml_linear(x, q.up) + b["up"].to(x.dtype)
        return ggml_linear(self.act.gated(gate, up), q.down) + b["down"].to(x.dtype)


def gguf_expert_loader(source: BiasedGGUFExpertSource, layers: list[int], act: ClampedSwiGLU
                       ) -> tuple[Callable, Callable[[int], int], int]:
    sizes = {layer: source.stored_nbytes(layer) for layer in layers}
    return (lambda layer, e: GptOssGGUFExpert(source.read_biased(layer, e), act), lambda layer: sizes[layer],
            max(sizes.values()))


def prepare(w: FusedExpertWeights, act: ClampedSwiGLU, dtype: torch.dtype, device) -> GptOssExpert:
    def cast(t):
        return t.to(device) if isinstance(t, mxfp4.Mxfp4Tensor) else t.to(device=device, dtype=dtype).contiguous()
    held = FusedExpertWeights(cast(w.gate_up), cast(w.gate_up_bias), cast(w.down_proj), cast(w.down_bias))
    return GptOssExpert(held, act, w.nbytes)


def fused_expert_loader(source: FusedExpertSource, layers: list[int], act: ClampedSwiGLU, dtype: torch.dtype,
                        device) -> tuple[Callable, Callable[[int], int], int]:
    """(load(layer, expert), nbytes_of(layer), largest expert's bytes) for the ExpertCache: MXFP4 experts are held
    as their bytes, float ones in the compute dtype (biases included in both)."""
    item = torch.empty(0, dtype=dtype).element_size()

    def held_nbytes(layer: int) -> int:
        total = 0
        for n in source.parts(layer).values():
            info = source.index.info(n, f"layer {layer} experts")
            per = info.nbytes // info.shape[0]
            total += per if info.dtype == torch.uint8 else per // info.dtype.itemsize * item  # bytes stay bytes
        return total

    sizes = {layer: held_nbytes(layer) for layer in layers}
    return (lambda layer, e: prepare(source.read_fused(layer, e), act, dtype, device),
            lambda layer: sizes[layer], max(sizes.values()))
