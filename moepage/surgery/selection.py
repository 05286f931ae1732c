"""Which experts to keep: per layer (extract) or from one global budget (prune), ranked by a profile metric.

Criteria (every one computed per MoE layer and expert from a profile's domain statistics):
- activation (default): router-weighted activation mass, the sum over ALL of the domain's tokens of
  gate weight x ||expert output|| (0 for tokens not routed to the expert) = REAP saliency x selection count.
  It weighs how often an expert is used as well as how much it contributes when used.
- saliency (alias reap): REAP as published, the MEAN of gate weight x ||output|| over only the tokens routed to
  the expert. It ignores frequency: an expert picked for 2 tokens with large outputs outranks one picked for
  2000 (measured on the demo model: layer 3 kept an expert with 2 of 2044 code tokens, perplexity 139.5
  against 129.2 by count), so it is no longer the default.
- count: selections; mass: sum of routing weights.
"""
from __future__ import annotations

DEFAULT_CRITERION = "activation"
CRITERIA = ("activation", "saliency", "reap", "count", "mass")
CRITERION_HELP = {
    "activation": "router-weighted activation mass: sum over the domain's tokens of gate x ||expert output|| "
                  "(REAP saliency x selection frequency)",
    "saliency": "REAP saliency: mean of gate x ||expert output|| over only the tokens routed to the expert "
                "(frequency-blind: a rarely used expert can outrank a busy one)",
    "reap": "same as saliency",
    "count": "how many tokens selected the expert",
    "mass": "sum of the expert's routing weights over the domain's tokens",
}


def criterion_matrix(stats: dict, criterion: str) -> list[list[float]]:
    """[MoE layer][expert] scores for a criterion (higher = keep first)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    if criterion == "activation":
        return [[s * c for s, c in zip(srow, crow)] for srow, crow in zip(stats["saliency"], stats["count"])]
    return stats["saliency" if criterion == "reap" else criterion]


def check_profile_matches(profile: dict, args) -> None:
    """The profile must describe a model with this checkpoint's MoE layers and expert count."""
    m = profile["model"]
    if m["num_experts"] != args.num_experts or list(m["moe_layers"]) != list(args.moe_layers):
        raise ValueError(
            f"the profile was made on a model with {m['num_experts']} experts in layers {m['moe_layers']}, "
            f"this checkpoint has {args.num_experts} experts in layers {list(args.moe_layers)}"
        )


def top_experts_per_layer(stats: dict, moe_layers: list[int], keep: int,
                          criterion: str = DEFAULT_CRITERION) -> dict[int, list[int]]:
    """{layer: sorted expert indices}: the `keep` best experts of every MoE layer."""
    score = criterion_matrix(stats, criterion)
    experts = len(stats["count"][0])
    if not 1 <= keep <= experts:
        raise ValueError(f"--keep must be between 1 and the model's {experts} experts per layer, got {keep}")
    kept = {}
    for row, layer in enumerate(moe_layers):
        # Highest score first; ties by selection count, then mass, then the lower index.
        order = sorted(range(experts), key=lambda e: (-score[row][e], -stats["count"][row][e],
                                                      -stats["mass"][row][e], e))
        kept[layer] = sorted(order[:keep])
    return kept


def global_budget_per_layer(stats: dict, moe_layers: list[int], total_keep: int,
                            criterion: str = DEFAULT_CRITERION) -> dict[int, int]:
    """How a global budget of `total_keep` experts would fall on each layer if every layer competed.

    Scores are normalised per layer (divided by the layer's total) so layers with larger activations do
    not take the whole budget; every layer keeps at least one expert.
    """
    score = criterion_matrix(stats, criterion)
    experts = len(stats["count"][0])
    if not len(moe_layers) <= total_keep <= experts * len(moe_layers):
        raise ValueError(f"a global budget must keep between {len(moe_layers)} and {experts * len(moe_layers)} experts, got {total_keep}")
    scored = []
    for row, layer in enumerate(moe_layers):
        total = sum(score[row]) or 1.0
        for e in range(experts):
            scored.append((score[row][e] / total, layer, e))
    best_first = sorted(scored, key=lambda t: (-t[0], t[1], t[2]))
    per_layer = {layer: 1 for layer in moe_layers}  # the top expert of each layer is always kept
    firsts = {layer: False for layer in moe_layers}
    taken = len(moe_layers)
    for _, layer, _e in best_first:
        if not firsts[layer]:
            firsts[layer] = True  # already counted in the minimum of one
            continue
        if taken >= total_keep:
            break
        per_layer[layer] += 1
        taken += 1
    return per_layer
