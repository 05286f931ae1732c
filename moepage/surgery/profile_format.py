"""The profile JSON written by `moepage profile`: loading, validation, per-domain metrics, specialization.

Layout (every per-expert metric is a list over the model's MoE layers of a list over experts):
{
  "format": "moepage-profile", "version": 1,
  "model": {"name", "family", "num_experts", "top_k", "moe_layers": [layer indices]},
  "settings": {"max_seq", "max_tokens_per_domain"},
  "domains": {name: {"sources": [{"path", "sha256", "chars"}], "tokens", "nll",
                     "count", "mass", "mean_norm", "saliency", "avg_gate", "shared_gate"}},
  "specialization": [per MoE layer, 0 = every domain routes alike, 1 = disjoint experts; null with one domain],
  "secretary": {"buckets", "ngrams": {domain: {bucket: count}}}
}
count: times the expert was selected; mass: sum of its routing weights; mean_norm: mean L2 norm of its
(unweighted) output over the tokens routed to it; saliency: REAP, mean of routing weight x output norm over
those tokens; avg_gate: mass / tokens, the expert's average routing weight over all of the domain's tokens
(0 where not selected); shared_gate: per layer, mean sigmoid gate of the shared expert (Qwen2-MoE) or null.
"""
from __future__ import annotations

import json
import math
import os

FORMAT = "moepage-profile"
VERSION = 1
METRICS = ("count", "mass", "mean_norm", "saliency", "avg_gate")


def load_profile(path: str) -> dict:
    try:
        with open(path) as f:
            profile = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: profile file not found (write one with `moepage profile`)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    validate_profile(profile, path)
    return profile


def validate_profile(profile: dict, where: str = "profile"):
    if not isinstance(profile, dict) or profile.get("format") != FORMAT:
        raise ValueError(f"{where}: not a moepage profile (expected \"format\": \"{FORMAT}\")")
    if profile.get("version") != VERSION:
        raise ValueError(f"{where}: profile version {profile.get('version')} is not supported (expected {VERSION})")
    layers = profile["model"]["moe_layers"]
    experts = profile["model"]["num_experts"]
    for name, d in profile["domains"].items():
        for metric in METRICS:
            rows = d.get(metric)
            if rows is None or len(rows) != len(layers) or any(len(r) != experts for r in rows):
                raise ValueError(f"{where}: domain {name!r} metric {metric!r} is not [{len(layers)} layers][{experts} experts]")


def domain(profile: dict, name: str) -> dict:
    try:
        return profile["domains"][name]
    except KeyError:
        raise ValueError(f"unknown domain {name!r}; the profile has: {', '.join(sorted(profile['domains']))}") from None


def combined_domain(profile: dict, names: list[str] | None = None) -> dict:
    """Token-weighted merge of several domains' metrics (all domains when names is None)."""
    names = sorted(profile["domains"]) if not names else names
    parts = [domain(profile, n) for n in names]
    tokens = sum(p["tokens"] for p in parts)
    shape = [(len(r)) for r in parts[0]["count"]]
    count = [[sum(p["count"][i][e] for p in parts) for e in range(n)] for i, n in enumerate(shape)]
    mass = [[sum(p["mass"][i][e] for p in parts) for e in range(n)] for i, n in enumerate(shape)]

    def weighted(metric):  # mean over routed tokens, combined by each domain's count
        return [[_div(sum(p[metric][i][e] * p["count"][i][e] for p in parts), count[i][e]) for e in range(n)]
                for i, n in enumerate(shape)]

    shared = None
    if parts[0].get("shared_gate") is not None:
        shared = [_div(sum(p["shared_gate"][i] * p["tokens"] for p in parts), tokens) for i in range(len(shape))]
    return {
        "tokens": tokens, "count": count, "mass": mass, "mean_norm": weighted("mean_norm"),
        "saliency": weighted("saliency"), "avg_gate": [[_div(m, tokens) for m in row] for row in mass],
        "shared_gate": shared,
    }


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def specialization(counts_by_domain: list[list[float]]) -> float | None:
    """Normalised Jensen-Shannon divergence of the domains' expert-selection distributions in one layer.

    0: every domain picks experts with the same frequencies; 1: domains use disjoint experts.
    None with fewer than two domains.
    """
    dists = []
    for row in counts_by_domain:
        total = sum(row)
        if total > 0:
            dists.append([c / total for c in row])
    if len(dists) < 2:
        return None
    mean = [sum(col) / len(dists) for col in zip(*dists)]
    entropy = lambda p: -sum(x * math.log(x) for x in p if x > 0)  # noqa: E731
    js = entropy(mean) - sum(entropy(p) for p in dists) / len(dists)
    return max(0.0, min(1.0, js / math.log(len(dists))))


def round_floats(obj, digits: int = 6):
    """Round every float to `digits` significant digits so the JSON is byte-stable."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def write_profile(profile: dict, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(round_floats(profile), f, sort_keys=True, separators=(",", ":"))
        f.write("\n")
