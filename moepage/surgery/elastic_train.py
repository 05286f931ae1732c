"""Elastic training: every row of a batch runs under its own serving budget, so one model learns them all.

A budget is a number of routed experts per token, k in 0..E (0: the shared expert alone, as `--shared-only` serves;
the model's top-k: exact routing; more: `--experts-per-token k`), optionally with experts dropped at random (each
expert absent from a row with probability p, at least one kept: what `--restrict-to-domain` and an extracted model
serve). Row b of step s gets budgets[(b // D + s) % len(budgets)] (D domains: each domain sees each budget, and the
assignment rotates from step to step), so a resumed run sees the same budgets; drops are drawn from a generator
seeded by (seed, step). The routing of a row is exactly surgery/elastic.ElasticRouting's for its budget, so what is
trained is what serving computes; the loss is the mean over rows, i.e. a nested (Matryoshka-style) sum of one loss
per budget.

Shape legend: B rows, T tokens per row, E routed experts, K' the widest budget in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moepage.engine.router import Router
from moepage.surgery.elastic import ElasticConfig, ElasticRouting


@dataclass(frozen=True)
class ElasticTrainConfig:
    budgets: tuple[int, ...] = ()  # routed experts per token, one entry per row group; () = off
    drop: float = 0.0  # probability that an expert is absent from a row

    @property
    def enabled(self) -> bool:
        return bool(self.budgets) or self.drop > 0

    def validate(self, num_experts: int, shared: bool):
        if not 0 <= self.drop < 1:
            raise ValueError(f"--elastic-drop must be in [0, 1), got {self.drop}")
        for k in self.budgets:
            if not 0 <= k <= num_experts:
                raise ValueError(f"elastic budget {k} is not between 0 and {num_experts} routed experts")
            if k == 0 and not shared:
                raise ValueError("elastic budget 0 (shared expert only) needs a model with a shared expert")
        if self.enabled and not num_experts:
            raise ValueError("elastic training needs an MoE model (this one has no routed experts)")


def row_budgets(cfg: ElasticTrainConfig, top_k: int, batch_size: int, num_domains: int, step: int) -> list[int]:
    budgets = cfg.budgets or (top_k,)
    return [budgets[(b // num_domains + step) % len(budgets)] for b in range(batch_size)]


def row_kept(cfg: ElasticTrainConfig, num_experts: int, batch_size: int, seed: int, step: int
             ) -> list[tuple[int, ...] | None]:
    """Per row, the experts it may use (None: all), dropped with probability cfg.drop, at least one kept."""
    if cfg.drop <= 0:
        return [None] * batch_size
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_777_777)
    out = []
    for _ in range(batch_size):
        keep = torch.rand(num_experts, generator=g) >= cfg.drop
        if not keep.any():
            keep[int(torch.randint(0, num_experts, (1,), generator=g))] = True
        out.append(None if keep.all() else tuple(int(e) for e in keep.nonzero().flatten()))
    return out


class RowBudgetRouting:
    """A TrainableDecoder routing_override: (layer, router logits [B*T, E]) -> (weights [B*T, K'], indices [B*T, K']),
    row b routed as ElasticRouting(budget b) routes; narrower rows are padded with index -1 (no expert runs)."""

    def __init__(self, model, budgets: list[int], kept: list[tuple[int, ...] | None], tokens_per_row: int):
        a = model.args
        self.T = tokens_per_row
        self.groups: dict[tuple, list[int]] = {}
        for b, (k, allowed) in enumerate(zip(budgets, kept)):
            self.groups.setdefault((k, allowed), []).append(b)
        self.routings = {}
        for k, allowed in self.groups:
            if k == 0:
                continue
            routers = {i: Router(model.p(f"layers.{i}.router"), a.routing) for i in a.moe_layers}
            cfg = ElasticConfig(experts_per_token=None if k == a.top_k else k, restrict_to=allowed)
            self.routings[(k, allowed)] = ElasticRouting(cfg, a.routing, a.num_experts, routers=routers)
        self.width = max((r.routing.top_k for r in self.routings.values()), default=0)

    def __call__(self, layer: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        BT = logits.shape[0]
        weights = torch.zeros(BT, self.width, dtype=logits.dtype, device=logits.device)
        indices = torch.full((BT, self.width), -1, dtype=torch.long, device=logits.device)
        for key, rows in self.groups.items():
            if key[0] == 0:
                continue  # shared expert only: every routed weight stays 0
            tok = torch.cat([torch.arange(b * self.T, (b + 1) * self.T) for b in rows]).to(logits.device)
            w, i = self.routings[key](layer, logits[tok])
            weights[tok, : w.shape[1]] = w.to(weights.dtype)
            indices[tok, : i.shape[1]] = i
        return weights, indices
