"""Router logits -> (weights, expert indices) for every routing variant we serve.

Shape legend: T tokens, E experts, K experts per token, G expert groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# "softmax_topk": softmax over all experts, then top-k (Qwen2/3-MoE, Qwen3.5, Qwen3-Next, OLMoE, Mixtral, Gemma 4).
# "topk_softmax": top-k over the logits, then softmax over the K (gpt-oss); its weights always sum to 1.
# "sigmoid_group_topk": sigmoid scores + correction bias, group-limited top-k (DeepSeek-V3, GLM-4.5).
# "softmax_group_greedy": softmax over all experts, the top-k of the topk_group groups with the highest single score
# (DeepSeek-V2's group_limited_greedy; greedy with n_group 1), never renormalised, times routed_scaling_factor.
SCORINGS = ("softmax_topk", "topk_softmax", "sigmoid_group_topk", "softmax_group_greedy")
GROUPED = ("sigmoid_group_topk", "softmax_group_greedy")


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    scoring: str = "softmax_topk"
    norm_topk_prob: bool = False
    # Mixtral keeps the routing weights in float32; Qwen/OLMoE cast them back to the logits dtype; gpt-oss takes
    # its softmax in the logits dtype.
    weights_in_logits_dtype: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    logits_in_float32: bool = False  # DeepSeek-V3/GLM: the router matmul runs on float32 hidden states and weight

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown routing scoring {self.scoring!r}; known: {', '.join(SCORINGS)}")
        if self.n_group < 1 or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"routing groups: need 1 <= topk_group <= n_group, got {self.topk_group} of "
                             f"{self.n_group}")
        if self.n_group > 1 and self.scoring not in GROUPED:
            raise ValueError(f"group-limited top-k (n_group {self.n_group}) is only defined for "
                             f"{' and '.join(GROUPED)}")

    def check_experts(self, num_experts: int) -> None:
        """The config fits a router over num_experts experts (one clear line otherwise)."""
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k {self.top_k} must be between 1 and the {num_experts} experts")
        if self.n_group > 1 and (num_experts % self.n_group or num_experts // self.n_group < 2):
            raise ValueError(f"{num_experts} experts do not split into {self.n_group} groups of at least 2")


def route(logits: torch.Tensor, cfg: RoutingConfig, bias: torch.Tensor | None = None,
          expert_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> weights [T, K], indices [T, K] (descending score order; sigmoid_group_topk: in the order
    of transformers' unsorted top-k, whose order its normalising sum runs in).

    bias [E]: e_score_correction_bias (sigmoid scoring: it steers the choice, not the weights);
    expert_scale [E]: each chosen expert's weight is multiplied by its scale (Gemma 4).
    """
    if cfg.scoring == "softmax_topk":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        weights, indices = torch.topk(probs, cfg.top_k, dim=-1)  # [T, K]
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif cfg.scoring == "topk_softmax":
        top, indices = torch.topk(logits, cfg.top_k, dim=-1)  # [T, K]
        weights = torch.softmax(top, dim=-1, dtype=top.dtype if cfg.weights_in_logits_dtype else torch.float32)
    elif cfg.scoring == "softmax_group_greedy":
        weights, indices = _softmax_group_greedy(logits, cfg)
    else:
        weights, indices = _sigmoid_group_topk(logits, cfg, bias)
    if expert_scale is not None:
        weights = weights * expert_scale[indices]
    if cfg.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return weights, indices


def _sigmoid_group_topk(logits: torch.Tensor, cfg: RoutingConfig, bias: torch.Tensor | None):
    """The ops of transformers' DeepseekV3TopkRouter (ties break the same way)."""
    scores = torch.sigmoid(logits.float())  # [T, E]
    choice = scores if bias is None else scores + bias.float()
    T, E = choice.shape
    if cfg.n_group > 1:
        grouped = choice.view(T, cfg.n_group, E // cfg.n_group)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False).indices  # [T, g]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(E // cfg.n_group, dim=1), float("-inf"))
    indices = torch.topk(choice, cfg.top_k, dim=-1, sorted=False).indices  # [T, K]
    weights = scores.gather(1, indices)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, indices


def _softmax_group_greedy(logits: torch.Tensor, cfg: RoutingConfig):
    """The ops of transformers' DeepseekV2TopkRouter (greedy / group_limited_greedy; ties break the same way)."""
    scores = torch.softmax(logits.float(), dim=-1, dtype=torch.float32)  # [T, E]
    T, E = scores.shape
    if cfg.n_group > 1:
        group_scores = scores.view(T, cfg.n_group, E // cfg.n_group).max(dim=-1).values  # [T, G]
        keep = torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False).indices  # [T, g]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        scores = scores.masked_fill(~mask.repeat_interleave(E // cfg.n_group, dim=1), 0.0)
    weights, indices = torch.topk(scores, cfg.top_k, dim=-1, sorted=False)  # [T, K]
    return weights * cfg.routed_scaling_factor, indices
