"""Elastic serving: approximate, opt-in routing modes that trade quality for memory or speed.

- experts_per_token K: route to K experts instead of the model's top-k (weights renormalised over the K).
- shared_only: no routed expert at all; only the always-on shared expert (Qwen2-MoE) runs.
- restrict_to: only these routed experts may be chosen (a domain's named expert: the rest never load).
- cache_margin m: cache-aware routing; a resident expert whose router probability is within m of a chosen
  non-resident one is preferred (scores = probs + m * resident), weights stay the true probabilities.
The default (ElasticConfig()) is exactly route(logits, cfg), so serving is unchanged unless a mode is named.
An ElasticRouting is a callable (layer, router_logits [T, E]) -> (weights [T, K'], indices [T, K']) that fits both
SparseMoE.elastic (serving) and TrainableDecoder(routing_override=...) (probing).

Shape legend: T tokens, E routed experts, K experts per token.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch

from moepage.kernels.routing import RoutingConfig, route

NAMED_EXPERTS_KEY = "moepage_named_experts"  # config.json: {"code": 0, "prose": 1, ...}


@dataclass(frozen=True)
class ElasticConfig:
    experts_per_token: int | None = None
    shared_only: bool = False
    restrict_to: tuple[int, ...] | None = None
    cache_margin: float | None = None

    @property
    def is_default(self) -> bool:
        return self == ElasticConfig()

    def describe(self) -> str:
        if self.is_default:
            return "full"
        parts = []
        if self.shared_only:
            parts.append("shared-only")
        if self.experts_per_token is not None:
            parts.append(f"k={self.experts_per_token}")
        if self.restrict_to is not None:
            parts.append("experts " + ",".join(map(str, self.restrict_to)))
        if self.cache_margin is not None:
            parts.append(f"cache-aware margin {self.cache_margin}")
        return " + ".join(parts)


class ElasticRouting:
    def __init__(self, cfg: ElasticConfig, routing: RoutingConfig, num_experts: int,
                 is_resident: Callable[[int, int], bool] | None = None):
        if cfg.experts_per_token is not None and not 1 <= cfg.experts_per_token <= num_experts:
            raise ValueError(f"--experts-per-token must be between 1 and {num_experts}, got {cfg.experts_per_token}")
        if cfg.restrict_to is not None:
            bad = [e for e in cfg.restrict_to if not 0 <= e < num_experts]
            if bad or not cfg.restrict_to:
                raise ValueError(f"restricted experts {list(cfg.restrict_to)} are not in 0..{num_experts - 1}")
        if cfg.cache_margin is not None and (cfg.cache_margin < 0 or is_resident is None):
            raise ValueError("cache-aware routing needs a margin >= 0 and an expert cache to ask")
        self.cfg = cfg
        self.num_experts = num_experts
        self.is_resident = is_resident
        k = cfg.experts_per_token or routing.top_k
        if cfg.restrict_to is not None:
            k = min(k, len(cfg.restrict_to))
        renormalise = routing.norm_topk_prob or k != routing.top_k
        self.routing = replace(routing, top_k=k, norm_topk_prob=renormalise)

    def __call__(self, layer: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = logits.shape[0]
        if self.cfg.shared_only:
            empty = torch.zeros(T, 0, dtype=logits.dtype, device=logits.device)
            return empty, torch.zeros(T, 0, dtype=torch.long, device=logits.device)
        if self.cfg.restrict_to is not None:
            allowed = torch.zeros(self.num_experts, dtype=torch.bool, device=logits.device)
            allowed[list(self.cfg.restrict_to)] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        if self.cfg.cache_margin is None:
            return route(logits, self.routing)
        return self._cache_aware(layer, logits)

    def _cache_aware(self, layer: int, logits: torch.Tensor):
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        resident = torch.tensor([self.is_resident(layer, e) for e in range(self.num_experts)],
                                dtype=torch.float32, device=logits.device)
        indices = torch.topk(probs + self.cfg.cache_margin * resident, self.routing.top_k, dim=-1).indices  # [T, K]
        weights = probs.gather(1, indices)
        if self.routing.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.routing.weights_in_logits_dtype:
            weights = weights.to(logits.dtype)
        return weights, indices


def named_experts(model_dir: str) -> dict[str, int]:
    """The {domain: expert} map a named-mode model records in its config.json (empty when it has none)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        return dict(json.load(f).get(NAMED_EXPERTS_KEY) or {})


def restrict_to_domain(model_dir: str, domain: str) -> tuple[int, ...]:
    mapping = named_experts(model_dir)
    if domain not in mapping:
        known = ", ".join(sorted(mapping)) or "none (not a named-expert model)"
        raise ValueError(f"--restrict-to-domain {domain!r}: the model's named experts are {known}")
    return (int(mapping[domain]),)


def apply_elastic(engine, cfg: ElasticConfig) -> None:
    """Install cfg on every MoE layer of a loaded Engine (ElasticConfig() restores exact routing)."""
    args = engine.args
    if cfg.shared_only and not args.shared_expert_intermediate_size:
        raise ValueError("--shared-only needs a model with a shared expert (Qwen2-MoE style); this one has none")
    hook = None
    if not cfg.is_default:
        cache = engine.model.cache
        hook = ElasticRouting(cfg, args.routing, args.num_experts,
                              is_resident=lambda layer, e: (layer, e) in cache)
    for block in engine.model.moe_blocks:
        block.elastic = hook
