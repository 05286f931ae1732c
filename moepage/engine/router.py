"""A MoE block's router: its weight, optional bias / correction bias / per-expert scale, and its RoutingConfig.

Decode, prefill, pre-gating, the elastic modes and the trainable twin all route through one of these, so every
path picks the same experts with the same weights.

Shape legend: T tokens, H hidden, E experts, K experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.routing import RoutingConfig, route


@dataclass(frozen=True, eq=False)
class Router:
    weight: torch.Tensor | None  # [E, H]; None for a router whose logits the caller computes
    config: RoutingConfig
    bias: torch.Tensor | None = None  # [E], added to the logits (gpt-oss)
    correction_bias: torch.Tensor | None = None  # [E], e_score_correction_bias: steers the choice only (DeepSeek-V3)
    expert_scale: torch.Tensor | None = None  # [E], multiplies each chosen expert's weight (Gemma 4)

    def __post_init__(self):
        if self.weight is not None:
            if len(self.weight.shape) != 2:
                raise ValueError(f"router weight must be [experts, hidden], got shape {tuple(self.weight.shape)}")
            self.config.check_experts(self.weight.shape[0])
        for name in ("bias", "correction_bias", "expert_scale"):
            t = getattr(self, name)
            if t is not None and (t.dim() != 1 or (self.weight is not None and t.shape[0] != self.weight.shape[0])):
                raise ValueError(f"router {name} must be [experts], got shape {tuple(t.shape)}")
        if self.correction_bias is not None and self.config.scoring != "sigmoid_group_topk":
            raise ValueError("a router correction bias needs sigmoid_group_topk scoring")

    @property
    def num_experts(self) -> int | None:
        return None if self.weight is None else self.weight.shape[0]

    @property
    def top_k(self) -> int:
        return self.config.top_k

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> router logits [T, E]."""
        if self.config.logits_in_float32:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)
        return linear(x, self.weight, self.bias)

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, E] -> weights [T, K], indices [T, K] (descending score order)."""
        return route(logits, self.config, self.correction_bias, self.expert_scale)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> weights [T, K], indices [T, K]."""
        return self.select(self.logits(x))

    def with_config(self, config: RoutingConfig) -> "Router":
        """The same tensors under another routing config (the elastic modes change top-k and renormalisation)."""
        return replace(self, config=config)

    @property
    def kernel_weight(self) -> torch.Tensor | None:
        """The weight whose product with the hidden state the fused decode kernel may compute as this router's
        logits (bf16, no bias); None when that product would not be them."""
        if self.bias is not None or self.config.logits_in_float32:
            return None
        return self.weight

    @property
    def selects_like_kernel(self) -> bool:
        """The fused decode kernel's softmax top-k (the same ATen ops as route()) is this router's selection."""
        return (self.config.scoring == "softmax_topk" and self.expert_scale is None
                and self.kernel_weight is not None)
