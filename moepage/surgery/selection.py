"""Which experts to keep: per layer (extract) or from one global budget (prune), ranked by a profile metric."""
from __future__ import annotations

CRITERIA = ("saliency", "count", "mass")  # saliency = REAP


def check_profile_matches(profile: dict, args) -> None:
    """The profile must describe a model with this checkpoint's MoE layers and expert count."""
    m = profile["model"]
    if m["num_experts"] != args.num_experts or list(m["moe_layers"]) != list(args.moe_layers):
        raise ValueError(
            f"the profile was made on a model with {m['num_experts']} experts in layers {m['moe_layers']}, "
            f"this checkpoint has {args.num_experts} experts in layers {list(args.moe_layers)}"
        )


def _rank_key(stats: dict, criterion: str, row: int, expert: int):
    # Highest criterion first; ties by selection count, then mass, then the lower index.
    return (-stats[criterion][row][expert], -stats["count"][row][expert], -stats["mass"][row][expert], expert)


def top_experts_per_layer(stats: dict, moe_layers: list[int], keep: int, criterion: str = "saliency") -> dict[int, list[int]]:
    """{layer: sorted expert indices}: the `keep` best experts of every MoE layer."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    experts = len(stats["count"][0])
    if not 1 <= keep <= experts:
        raise ValueError(f"--keep must be between 1 and the model's {experts} experts per layer, got {keep}")
    kept = {}
    for row, layer in enumerate(moe_layers):
        order = sorted(range(experts), key=lambda e: _rank_key(stats, criterion, row, e))
        kept[layer] = sorted(order[:keep])
    return kept


def global_budget_per_layer(stats: dict, moe_layers: list[int], total_keep: int, criterion: str = "saliency") -> dict[int, int]:
    """How a global budget of `total_keep` experts would fall on each layer if every layer competed.

    Saliency is normalised per layer (divided by the layer's total) so layers with larger activations do
    not take the whole budget; every layer keeps at least one expert.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    experts = len(stats["count"][0])
    if not len(moe_layers) <= total_keep <= experts * len(moe_layers):
        raise ValueError(f"a global budget must keep between {len(moe_layers)} and {experts * len(moe_layers)} experts, got {total_keep}")
    scored = []
    for row, layer in enumerate(moe_layers):
        total = sum(stats[criterion][row]) or 1.0
        for e in range(experts):
            scored.append((stats[criterion][row][e] / total, layer, e))
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
