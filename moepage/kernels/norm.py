"""RMSNorm computed the way the reference implementations do (float32 inside, weight applied in input dtype)."""
from __future__ import annotations

import torch

from moepage.kernels import native


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous():
        fast = native.load("bf16_decode")
        if fast is not None:  # one call instead of six ops; same rounding steps
            return fast.rms_norm(x, weight, eps)
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm_float_weight(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """gpt-oss's RMSNorm: the weight times the float32 normalised h, rounded once (Llama rounds h first)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(torch.float32) * h).to(x.dtype)


def rms_norm_unit_offset(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm (Qwen3.5/3.6, Qwen3-Next, Gemma): `(h * (1 + w))` multiplied in float32, rounded once."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.to(torch.float32))).to(x.dtype)
