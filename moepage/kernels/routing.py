"""Router logits -> (weights, expert indices) for every routing variant we serve.

Shape legend: T tokens, E experts, K experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    # "softmax_topk": softmax over all experts, then top-k (Qwen2/3-MoE, OLMoE, Mixtral renormalised).
    # "sigmoid_group_topk": sigmoid scores + correction bias, group-limited top-k (DeepSeek-V3).
    scoring: str = "softmax_topk"
    norm_topk_prob: bool = False
    # Mixtral keeps the routing weights in float32; Qwen/OLMoE cast them back to the logits dtype.
    weights_in_logits_dtype: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.scoring not in ("softmax_topk", "sigmoid_group_topk"):
            raise ValueError(f"unknown routing scoring {self.scoring!r}")


def route(
    logits: torch.Tensor, cfg: RoutingConfig, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> weights [T, K], indices [T, K] (indices in descending score order)."""
    if cfg.scoring == "softmax_topk":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        weights, indices = torch.topk(probs, cfg.top_k, dim=-1)  # [T, K]
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        scores = torch.sigmoid(logits.float())  # [T, E]
        choice = scores if bias is None else scores + bias.float()
        T, E = choice.shape
        if cfg.n_group > 1:
            grouped = choice.view(T, cfg.n_group, E // cfg.n_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
            keep = torch.topk(group_scores, cfg.topk_group, dim=-1).indices  # [T, g]
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~mask.repeat_interleave(E // cfg.n_group, dim=1), float("-inf"))
        indices = torch.topk(choice, cfg.top_k, dim=-1).indices  # [T, K]
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
    if cfg.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return weights, indices
