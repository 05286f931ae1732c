"""Probe a trained model on held-out domain text: perplexity per domain, routing share, separation, accuracy.

- perplexity: exp(mean next-token loss) over the first `tokens_per_domain` held-out tokens, in windows of seq_len.
- routing share [domain][layer][expert]: fraction of the domain's top-k selections that went to each expert.
- separation [layer]: mean over domain pairs of the total-variation distance between their routing shares
  (0 = every domain is routed alike, 1 = domains use disjoint experts).
- routing accuracy (named mode) [domain][layer]: fraction of tokens whose top-1 router choice is the domain's
  expert (domain i -> expert i), plus the mean over layers.
Floats are rounded to 6 digits so the same model and data give byte-identical JSON.

Shape legend: B windows, S tokens per window, E routed experts, K experts per token.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from moepage.surgery.corpus import DomainCorpus
from moepage.surgery.trainable_model import TrainableDecoder

DIGITS = 6


@dataclass(frozen=True)
class ProbeConfig:
    tokens_per_domain: int = 4096
    seq_len: int = 256
    batch_windows: int = 8
    named: bool = False  # report routing accuracy toward expert i for domain i
    split: str = "heldout"

    def validate(self):
        if self.tokens_per_domain < 2 or self.seq_len < 2 or self.batch_windows < 1:
            raise ValueError("tokens_per_domain and seq_len must be >= 2, batch_windows >= 1")
        if self.split not in ("heldout", "train"):
            raise ValueError(f"split must be heldout or train, got {self.split!r}")


def windows(stream: np.ndarray, cfg: ProbeConfig) -> torch.Tensor:
    """Non-overlapping [B, S+1] windows covering the first tokens_per_domain tokens (adjacent windows share 1)."""
    n = min(stream.size, cfg.tokens_per_domain + 1)
    count = (n - 1) // cfg.seq_len
    if count < 1:
        raise ValueError(f"{n} held-out tokens are fewer than one window of {cfg.seq_len + 1}")
    rows = [stream[i * cfg.seq_len : i * cfg.seq_len + cfg.seq_len + 1] for i in range(count)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def _round(x: float) -> float:
    return round(float(x), DIGITS)


@torch.no_grad()
def probe(model: TrainableDecoder, corpus: DomainCorpus, cfg: ProbeConfig = ProbeConfig(),
          routing_override: Callable | None = None) -> dict:
    cfg.validate()
    model.eval()
    a = model.args
    moe_layers = a.moe_layers
    E = a.num_experts
    result = {"perplexity": {}, "tokens": {}}
    share = {}
    accuracy = {}
    for d_index, domain in enumerate(corpus.domains):
        data = windows(getattr(corpus, cfg.split)[domain], cfg)
        nll, count = 0.0, 0
        counts = torch.zeros(len(moe_layers), max(E, 1), dtype=torch.float64)  # [L, E]
        hits = torch.zeros(len(moe_layers), dtype=torch.float64)
        for chunk in data.split(cfg.batch_windows):
            out = model(chunk[:, :-1], routing_override=routing_override)
            logits = out.logits.float()
            targets = chunk[:, 1:].reshape(-1)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum").item()
            count += chunk[:, 1:].numel()
            for j, (router, indices) in enumerate(zip(out.router_logits, out.routed_indices)):
                if indices.numel():
                    counts[j] += torch.bincount(indices.reshape(-1), minlength=E).double()
                hits[j] += (router.argmax(-1) == d_index).double().sum()
        result["perplexity"][domain] = _round(math.exp(nll / count))
        result["tokens"][domain] = count
        if moe_layers:
            totals = counts.sum(-1, keepdim=True).clamp_min(1)
            share[domain] = [[_round(v) for v in row] for row in (counts / totals).tolist()]
            accuracy[domain] = [_round(v / count) for v in hits.tolist()]
    result["perplexity"]["mean"] = _round(sum(result["perplexity"][d] for d in corpus.domains) / len(corpus.domains))
    if moe_layers:
        result["layers"] = list(moe_layers)
        result["routing_share"] = share
        result["separation"] = separation(share, len(moe_layers))
        if cfg.named:
            result["routing_accuracy"] = {d: {"per_layer": accuracy[d], "mean": _round(np.mean(accuracy[d]))}
                                          for d in corpus.domains}
            result["routing_accuracy"]["mean"] = _round(np.mean([accuracy[d] for d in corpus.domains]))
    return result


def separation(share: dict[str, list[list[float]]], layers: int) -> list[float]:
    """Per layer: mean pairwise total-variation distance between the domains' routing shares."""
    domains = sorted(share)
    out = []
    for j in range(layers):
        pairs = [0.5 * np.abs(np.array(share[x][j]) - np.array(share[y][j])).sum()
                 for x, y in itertools.combinations(domains, 2)]
        out.append(_round(np.mean(pairs)) if pairs else 0.0)
    return out


def write_routing_png(result: dict, path: str, title: str = "routing share per domain and layer"):
    """One panel per MoE layer: rows = domains, columns = experts, colour = share of the domain's selections."""
    if "routing_share" not in result:
        raise ValueError("the probe result has no routing (a dense model?)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the routing PNG needs matplotlib (pip install matplotlib)") from e
    domains = list(result["routing_share"])
    layers = result["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers) + 1, 0.5 * len(domains) + 1.6), squeeze=False)
    for j, layer in enumerate(layers):
        ax = axes[0][j]
        grid = np.array([result["routing_share"][d][j] for d in domains])
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {layer}")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if j == 0 else [""] * len(domains))
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
