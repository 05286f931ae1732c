"""Elastic serving flags shared by `moepage serve` and `moepage generate` (logic: moepage/surgery/elastic.py).

Exact routing is the default; every flag here is an opt-in approximation and the startup log says so.
"""
from __future__ import annotations

import argparse


def _margin(value: str) -> float:
    m = float(value)
    if m < 0:
        raise argparse.ArgumentTypeError("the margin must be >= 0")
    return m


def _positive(value: str) -> int:
    k = int(value)
    if k < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return k


def add_elastic_arguments(p: argparse.ArgumentParser):
    g = p.add_argument_group("elastic routing (approximate, opt-in; default: the model's exact routing)")
    g.add_argument("--experts-per-token", type=_positive, default=None, metavar="K",
                   help="route each token to K experts instead of the model's top-k (weights renormalised)")
    g.add_argument("--shared-only", action="store_true",
                   help="run no routed expert, only the shared expert (Qwen2-MoE style models)")
    g.add_argument("--restrict-to-domain", default=None, metavar="NAME",
                   help="only the experts domain NAME uses may be chosen (needs --profile P, or a model with named "
                        "experts such as the demo model); the others are never read from disk")
    g.add_argument("--profile", default=None, metavar="P", help="profile JSON (`moepage profile`) for --restrict-to-domain")
    g.add_argument("--restrict-experts", type=_positive, default=None, metavar="N",
                   help="experts per layer --restrict-to-domain keeps from the profile (default: the model's top-k)")
    g.add_argument("--cache-aware-margin", type=_margin, default=None, metavar="M",
                   help="prefer an expert already in the cache when its router probability is within M of a "
                        "chosen expert that is not (fewer page-ins, approximate)")


def _options(args) -> dict:
    return dict(experts_per_token=args.experts_per_token, shared_only=args.shared_only,
                restrict_to_domain=args.restrict_to_domain, profile_path=args.profile,
                restrict_experts=args.restrict_experts, cache_margin=args.cache_aware_margin)


def check_elastic_args(args) -> None:
    """Fail on contradictory flags before the model is loaded."""
    from moepage.surgery.elastic import check_elastic_options

    check_elastic_options(**_options(args))


def elastic_from_args(engine, args):
    from moepage.surgery.elastic import elastic_for_engine

    return elastic_for_engine(engine, **_options(args))


def routing_log_line(cfg) -> str:
    if cfg.is_default:
        return "routing: exact (the model's own top-k; no approximate mode)"
    return (f"routing: APPROXIMATE ({cfg.describe()}): outputs differ from the model's exact routing; "
            "drop the elastic flags for exact results")


def install_elastic(engine, args) -> tuple[object, str]:
    """Build the ElasticConfig from the flags, install it on the loaded engine; (config, log line)."""
    from moepage.surgery.elastic import apply_elastic

    cfg = elastic_from_args(engine, args)
    apply_elastic(engine, cfg)
    return cfg, routing_log_line(cfg)
