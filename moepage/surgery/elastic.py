"""Elastic serving: approximate, opt-in routing modes that trade quality for memory or speed.

- experts_per_token K: route to K experts instead of the model's top-k (weights renormalised over the K).
- shared_only: no routed expert at all; only the always-on shared expert (Qwen2-MoE) runs.
- restrict_to: only these routed experts may be chosen (a domain's named expert: the rest never load); a tuple
  for every layer, or {layer: tuple} (a domain's most used experts per layer, from a profile).
- cache_margin m: cache-aware routing; a resident expert whose router probability is within m of a chosen
  non-resident one is preferred (scores = probs + m * resident), weights stay the true probabilities.
The default (ElasticConfig()) is exactly the layer Router's selection, so serving is unchanged unless a mode is named.
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

from moepage.engine.router import Router
from moepage.kernels.routing import RoutingConfig

NAMED_EXPERTS_KEY = "moepage_named_experts"  # config.json: {"code": 0, "prose": 1, ...}


@dataclass(frozen=True)
class ElasticConfig:
    experts_per_token: int | None = None
    shared_only: bool = False
    restrict_to: tuple[int, ...] | dict[int, tuple[int, ...]] | None = None
    cache_margin: float | None = None
    label: str | None = None  # how the restriction was chosen, for logs ("domain 'code' (profile)")

    @property
    def is_default(self) -> bool:
        return replace(self, label=None) == ElasticConfig()

    def allowed(self, layer: int) -> tuple[int, ...] | None:
        if isinstance(self.restrict_to, dict):
            return tuple(self.restrict_to[layer])
        return self.restrict_to

    def describe(self) -> str:
        if self.is_default:
            return "full"
        parts = []
        if self.shared_only:
            parts.append("shared-only")
        if self.experts_per_token is not None:
            parts.append(f"k={self.experts_per_token}")
        if isinstance(self.restrict_to, dict):
            per = "; ".join(f"L{layer}: {','.join(map(str, e))}" for layer, e in sorted(self.restrict_to.items()))
            parts.append(f"experts restricted to {self.label or 'a set per layer'} ({per})")
        elif self.restrict_to is not None:
            parts.append(f"experts restricted to {self.label + ' = ' if self.label else ''}"
                         + ",".join(map(str, self.restrict_to)))
        if self.cache_margin is not None:
            parts.append(f"cache-aware margin {self.cache_margin}")
        return " + ".join(parts)


class ElasticRouting:
    def __init__(self, cfg: ElasticConfig, routing: RoutingConfig, num_experts: int,
                 is_resident: Callable[[int, int], bool] | None = None, routers: dict[int, Router] | None = None):
        """routers: each MoE layer's Router (its biases and scales); without them routing alone decides."""
        if cfg.experts_per_token is not None and not 1 <= cfg.experts_per_token <= num_experts:
            raise ValueError(f"--experts-per-token must be between 1 and {num_experts}, got {cfg.experts_per_token}")
        sets = list(cfg.restrict_to.values()) if isinstance(cfg.restrict_to, dict) else \
            [cfg.restrict_to] if cfg.restrict_to is not None else []
        for allowed in sets:
            bad = [e for e in allowed if not 0 <= e < num_experts]
            if bad or not allowed:
                raise ValueError(f"restricted experts {list(allowed)} are not in 0..{num_experts - 1}")
        if cfg.cache_margin is not None and (cfg.cache_margin < 0 or is_resident is None):
            raise ValueError("cache-aware routing needs a margin >= 0 and an expert cache to ask")
        self.cfg = cfg
        self.num_experts = num_experts
        self.is_resident = is_resident
        k = cfg.experts_per_token or routing.top_k
        if sets:
            k = min(k, min(len(a) for a in sets))
        renormalise = routing.norm_topk_prob or k != routing.top_k
        self.routing = replace(routing, top_k=k, norm_topk_prob=renormalise)
        if cfg.cache_margin is not None and routing.scoring != "softmax_topk":
            raise ValueError(f"cache-aware routing needs softmax top-k routers, not {routing.scoring}")
        self._router = Router(None, self.routing)
        self._routers = {layer: r.with_config(replace(r.config, top_k=k, norm_topk_prob=renormalise))
                         for layer, r in (routers or {}).items()}

    def __call__(self, layer: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = logits.shape[0]
        if self.cfg.shared_only:
            empty = torch.zeros(T, 0, dtype=logits.dtype, device=logits.device)
            return empty, torch.zeros(T, 0, dtype=torch.long, device=logits.device)
        experts = self.cfg.allowed(layer)
        if experts is not None:
            allowed = torch.zeros(self.num_experts, dtype=torch.bool, device=logits.device)
            allowed[list(experts)] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        if self.cfg.cache_margin is None:
            return self._routers.get(layer, self._router).select(logits)
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


def restrict_from_profile(profile: dict, domain: str, moe_layers: list[int], keep: int) -> dict[int, tuple[int, ...]]:
    """{layer: experts}: the `keep` experts of each MoE layer the domain uses most (extract's default ranking)."""
    from moepage.surgery.profile_format import domain as profile_domain
    from moepage.surgery.selection import top_experts_per_layer

    return {layer: tuple(e) for layer, e in
            top_experts_per_layer(profile_domain(profile, domain), moe_layers, keep).items()}


def check_elastic_options(*, experts_per_token: int | None = None, shared_only: bool = False,
                          restrict_to_domain: str | None = None, profile_path: str | None = None,
                          restrict_experts: int | None = None, cache_margin: float | None = None) -> None:
    """What can be checked before a model is loaded: contradictory flags, a missing profile file."""
    if shared_only and (experts_per_token is not None or restrict_to_domain or cache_margin is not None):
        raise ValueError("--shared-only runs no routed expert: it cannot be combined with --experts-per-token, "
                         "--restrict-to-domain or --cache-aware-margin")
    if restrict_experts is not None and not restrict_to_domain:
        raise ValueError("--restrict-experts needs --restrict-to-domain")
    if profile_path and not restrict_to_domain:
        raise ValueError("--profile is read for --restrict-to-domain; give the domain too")
    if profile_path and not os.path.isfile(profile_path):
        raise FileNotFoundError(f"{profile_path}: profile file not found (write one with `moepage profile`)")
    if cache_margin is not None and cache_margin < 0:
        raise ValueError("--cache-aware-margin must be >= 0")


def elastic_for_engine(engine, *, experts_per_token: int | None = None, shared_only: bool = False,
                       restrict_to_domain: str | None = None, profile_path: str | None = None,
                       restrict_experts: int | None = None, cache_margin: float | None = None) -> ElasticConfig:
    """The ElasticConfig that serving flags ask for on a loaded Engine (ElasticConfig() when none is given).

    --restrict-to-domain NAME takes the domain's `restrict_experts` (default: the model's top-k) most used experts
    per layer from the profile at profile_path; without a profile, a named-expert model's config.json mapping
    (the demo model's `code` -> expert 0) is used; otherwise it is an error.
    """
    check_elastic_options(experts_per_token=experts_per_token, shared_only=shared_only,
                          restrict_to_domain=restrict_to_domain, profile_path=profile_path,
                          restrict_experts=restrict_experts, cache_margin=cache_margin)
    args = engine.args
    restrict, label = None, None
    if restrict_to_domain:
        if profile_path:
            from moepage.surgery.profile_format import load_profile
            from moepage.surgery.selection import check_profile_matches

            profile = load_profile(profile_path)
            check_profile_matches(profile, args)
            keep = restrict_experts or args.top_k
            if not 1 <= keep <= args.num_experts:
                raise ValueError(f"--restrict-experts must be between 1 and {args.num_experts}, got {keep}")
            restrict = restrict_from_profile(profile, restrict_to_domain, list(args.moe_layers), keep)
            label = f"domain {restrict_to_domain!r} (top {keep} per layer in {os.path.basename(profile_path)})"
        else:
            mapping = dict((getattr(engine.ckpt, "config", None) or {}).get(NAMED_EXPERTS_KEY) or {})
            if restrict_to_domain not in mapping:
                known = f"; its named experts are {', '.join(sorted(mapping))}" if mapping else ""
                raise ValueError(f"--restrict-to-domain {restrict_to_domain!r} needs --profile P (a `moepage profile` "
                                 f"with that domain){known}")
            restrict = (int(mapping[restrict_to_domain]),)
            label = f"domain {restrict_to_domain!r} (named expert)"
    return ElasticConfig(experts_per_token=experts_per_token, shared_only=shared_only, restrict_to=restrict,
                         cache_margin=cache_margin, label=label)


def apply_elastic(engine, cfg: ElasticConfig) -> None:
    """Install cfg on every MoE layer of a loaded Engine (ElasticConfig() restores exact routing)."""
    args = engine.args
    if cfg.shared_only and not args.shared_expert_intermediate_size:
        raise ValueError("--shared-only needs a model with a shared expert (Qwen2-MoE style); this one has none")
    hook = None
    if not cfg.is_default:
        cache = engine.model.cache
        hook = ElasticRouting(cfg, args.routing, args.num_experts,
                              is_resident=lambda layer, e: (layer, e) in cache,
                              routers={block.layer: block.gate for block in engine.model.moe_blocks})
    for block in engine.model.moe_blocks:
        block.elastic = hook
