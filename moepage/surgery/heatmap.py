"""Heatmap PNG of a profile: layers x experts, one panel per domain (matplotlib, optional)."""
from __future__ import annotations

METRIC_LABELS = {
    "share": "share of the layer's selections",
    "saliency": "REAP saliency (routing weight x output norm)",
    "avg_gate": "average routing weight",
}


class MatplotlibMissing(RuntimeError):
    pass


def _matrix(domain: dict, metric: str) -> list[list[float]]:
    if metric == "share":
        return [[c / (sum(row) or 1) for c in row] for row in domain["count"]]
    return domain[metric]


def write_heatmap(profile: dict, path: str, metric: str = "share") -> str:
    """Write the PNG and return its path; MatplotlibMissing when matplotlib is not installed."""
    if metric not in METRIC_LABELS:
        raise ValueError(f"unknown heatmap metric {metric!r}; choose from {', '.join(METRIC_LABELS)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MatplotlibMissing("matplotlib is not installed: skipping the heatmap PNG "
                                "(pip install matplotlib, or moepage[plot])") from None
    names = sorted(profile["domains"])
    layers = profile["model"]["moe_layers"]
    experts = profile["model"]["num_experts"]
    spec = profile.get("specialization") or [None] * len(layers)
    mats = [_matrix(profile["domains"][n], metric) for n in names]
    vmax = max((v for m in mats for row in m for v in row), default=1.0) or 1.0
    width = min(6.5 + 0.18 * experts, 30)
    height = 1.2 + 0.28 * len(layers)
    fig, axes = plt.subplots(len(names), 1, figsize=(width, height * len(names) + 0.6), squeeze=False)
    for ax, name, mat in zip(axes[:, 0], names, mats):
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        tokens = profile["domains"][name]["tokens"]
        ax.set_title(f"{name} ({tokens} tokens)", fontsize=10)
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([f"{layer}" + (f"  s={s:.2f}" if s is not None else "") for layer, s in zip(layers, spec)],
                           fontsize=7)
        step = max(1, experts // 32)
        ax.set_xticks(range(0, experts, step))
        ax.tick_params(axis="x", labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    axes[-1, 0].set_xlabel("expert")
    fig.suptitle(f"{profile['model']['name']}: {METRIC_LABELS[metric]}\n"
                 "s = layer specialization (0: domains route alike, 1: disjoint experts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
