"""Rotary position embeddings.

Shape legend: T tokens, N heads, D head dim.
"""
from __future__ import annotations

import math

import torch

from moepage.kernels import native


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the attention scaling factor for the rope type in `scaling`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "yarn":
        factor = float(scaling["factor"])
        original = int(scaling.get("original_max_position_embeddings") or 0)
        beta_fast = float(scaling.get("beta_fast") or 32)
        beta_slow = float(scaling.get("beta_slow") or 1)
        mscale = scaling.get("attention_factor")
        get_mscale = lambda m=1.0: 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0  # noqa: E731
        if mscale is None and scaling.get("mscale") and scaling.get("mscale_all_dim"):  # DeepSeek's YaRN
            mscale = get_mscale(float(scaling["mscale"])) / get_mscale(float(scaling["mscale_all_dim"]))
        elif mscale is None:
            mscale = get_mscale()

        def correction_dim(rot):
            return (head_dim * math.log(original / (rot * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):  # gpt-oss sets truncate false: the range is not rounded outwards
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = (torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)
        extrapolation = 1 - ramp.clamp(0, 1)
        pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        inv_interp = 1.0 / (factor * pos_freqs)
        inv_extra = 1.0 / pos_freqs
        return inv_interp * (1 - extrapolation) + inv_extra * extrapolation, float(mscale)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


class RotaryTable:
    """cos/sin rows computed exactly as the reference does, cached per position range."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, dtype: torch.dtype, device):
        self.inv_freq, self.attention_scaling = rope_inv_freq(head_dim, theta, scaling)
        self.inv_freq = self.inv_freq.to(device)
        self.dtype = dtype
        self.cos = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.sin = torch.empty(0, head_dim, dtype=dtype, device=device)

    def _grow(self, n: int):
        n = max(n, 2 * self.cos.shape[0], 256)
        pos = torch.arange(n, device=self.inv_freq.device).float()
        freqs = pos[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        self.cos = (emb.cos() * self.attention_scaling).to(self.dtype)
        self.sin = (emb.sin() * self.attention_scaling).to(self.dtype)

    def get(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.cos.shape[0]:
            self._grow(start + length)
        return self.cos[start : start + length], self.sin[start : start + length]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [1, N, T, D], cos/sin [T, D]."""
    if x.dtype == torch.bfloat16 and cos.dtype == torch.bfloat16 and x.device.type == "cpu" and x.stride(-1) == 1:
        fast = native.load("bf16_decode")
        if fast is not None:  # same rounding steps as below, one call
            return fast.rope(x, cos, sin)
    return (x * cos) + (rotate_half(x) * sin)
