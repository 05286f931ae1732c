"""The sparse MoE block: its Router, routed experts through the ExpertCache, optional shared expert.

Shape legend: T tokens, H hidden, E experts, K experts per token, I expert intermediate size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from moepage.engine.router import Router
from moepage.kernels.cpu_bf16 import experts_one_token
from moepage.kernels.experts import swiglu, swiglu_fused
from moepage.kernels.ggml_experts import experts_one_token as quantized_experts_one_token
from moepage.kernels.routing import RoutingConfig
from moepage.paging.cache import ExpertCache
from moepage.paging.pread import ALIGN
from moepage.paging.sources import ExpertWeights


@dataclass
class PreparedExpert:
    """One routed expert ready to compute: w13 [2I, H] (gate rows, then up rows), w2 [H, I]."""

    w13: torch.Tensor
    w2: torch.Tensor
    stored_nbytes: int
    buffer: torch.Tensor | None = None  # the cache slot (aligned uint8) w13 and w2 live in, recycled on eviction

    @property
    def nbytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, H] -> [t, H] (QuantizedExpert has the same method for GGML-quantized experts)."""
        return swiglu_fused(x, self.w13, self.w2)

    @staticmethod
    def nbytes_for(hidden: int, intermediate: int, dtype: torch.dtype) -> int:
        """Upper bound of the memory one prepared expert holds: its weights, plus the page alignment of a
        zero-copy read (the weights stay in the aligned buffer they were read into)."""
        return 3 * hidden * intermediate * torch.empty(0, dtype=dtype).element_size() + 3 * ALIGN


def _rows_back_to_back(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b's rows follow a's in the same storage (same dtype and row width): together they are one tensor."""
    return (a.dim() == 2 and b.dim() == 2 and a.dtype == b.dtype and a.shape[1] == b.shape[1]
            and a.is_contiguous() and b.is_contiguous() and a.device == b.device
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size())


def _inside(t: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    return buffer is not None and t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def prepare_expert(w: ExpertWeights, dtype: torch.dtype, device, buffer: torch.Tensor | None = None
                   ) -> PreparedExpert:
    """buffer: the slot w was read into; kept on the result when the weights are used where they lie."""
    device = torch.device(device)
    if w.gate.dtype == dtype and w.gate.device == device and _rows_back_to_back(w.gate, w.up):
        w13 = w.gate.new_empty(0).set_(w.gate.untyped_storage(), w.gate.storage_offset(),
                                      (w.gate.shape[0] + w.up.shape[0], w.gate.shape[1]))  # [2I, H], no copy
    else:
        w13 = torch.cat([w.gate, w.up], dim=0).to(device=device, dtype=dtype)  # [2I, H]
    w2 = w.down.to(device=device, dtype=dtype).contiguous()  # [H, I]
    w13 = w13.contiguous()
    kept = buffer if _inside(w13, buffer) and _inside(w2, buffer) else None
    return PreparedExpert(w13, w2, w.nbytes, kept)


RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
# (layer, expert, x rows [t, H] routed to it, their routing weights [t], its unweighted output [t, H])
ExpertOutputObserver = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]
# (layer, router logits [T, E]) -> (weights [T, K'], indices [T, K']) replacing the Router's selection when set
ElasticHook = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SparseMoE:
    def __init__(
        self,
        layer: int,
        router: Router | torch.Tensor,  # a Router, or its weight [E, H] with routing
        routing: RoutingConfig | None,
        cache: ExpertCache,
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # gate, up, down
        shared_gate: torch.Tensor | None = None,  # [1, H]
    ):
        self.layer = layer
        if not isinstance(router, Router):
            if routing is None:
                raise ValueError(f"layer {layer}: a router weight needs its RoutingConfig")
            router = Router(router, routing)
        self.gate = router  # the block's Router (transformers names it mlp.gate too)
        self.cache = cache
        self.shared = shared
        self.shared_gate = shared_gate
        self.observers: list[RoutingObserver] = []
        self.output_observers: list[ExpertOutputObserver] = []  # profiling (REAP saliency); empty when serving
        self.prefetch = True
        self.elastic: ElasticHook | None = None  # opt-in approximate routing (surgery/elastic.py); None = exact
        # Pre-gating: during a decode step, this layer's input through the next sparse layer's router predicts
        # that layer's experts, whose reads start while this layer computes (Mixtral-offloading's speculation).
        self.next: SparseMoE | None = None
        self.pregate = True
        self._guess: set[int] | None = None  # what the previous layer predicted for this one

    @property
    def routing(self) -> RoutingConfig:
        return self.gate.config

    @property
    def router(self) -> torch.Tensor | None:
        """What the fused decode kernel multiplies by for this block's router logits (Router.kernel_weight)."""
        return self.gate.kernel_weight

    def __call__(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H]; logits [T, E] = x through the router when the caller already computed them."""
        shared_out = swiglu(x, *self.shared) if self.shared is not None else None
        if logits is None:
            logits = self.gate.logits(x)  # [T, E]
        weights, indices = self.gate.select(logits) if self.elastic is None else self.elastic(self.layer, logits)
        if self._guess is not None:
            self._score_guess(indices)
        for obs in self.observers:
            obs(self.layer, logits, weights, indices)
        out = self.experts(x, indices, weights)
        if shared_out is not None:
            if self.shared_gate is not None:
                shared_out = torch.sigmoid(F.linear(x, self.shared_gate)) * shared_out
            out = out + shared_out
        return out

    def experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum over each token's K experts, in ascending expert order so paging never changes the sum."""
        if indices.shape[-1] == 0:  # no routed expert (elastic shared-only)
            return torch.zeros_like(x)
        if x.shape[0] == 1:
            return self._experts_one_token(x, indices[0].tolist(), weights[0])
        if not self.output_observers:  # GGML-quantized experts: one C++ call a layer (engine/quantized_expert.py)
            from moepage.engine.quantized_expert import experts_prefill

            order = sorted(set(indices.reshape(-1).tolist()))
            self._prefetch(order)
            out = experts_prefill(self.cache, self.layer, x, indices, weights, order)
            if out is not None:
                return out
        out = torch.zeros_like(x)  # [T, H]
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for t, row in enumerate(indices.tolist()):
            for k, e in enumerate(row):
                groups.setdefault(e, ([], []))
                groups[e][0].append(k)
                groups[e][1].append(t)
        order = sorted(groups)
        self._prefetch(order)
        for e in order:
            ks, ts = groups[e]
            # transformers orders rows by top-k slot, then token; keep that order.
            pairs = sorted(zip(ks, ts))
            pos = torch.tensor([p[0] for p in pairs])
            tok = torch.tensor([p[1] for p in pairs])
            with self.cache.use((self.layer, e)) as ex:
                h = ex.compute(x[tok])  # [t, H]
            for obs in self.output_observers:
                obs(self.layer, e, x[tok], weights[tok, pos], h)
            h = h * weights[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out

    def _prefetch(self, experts: list[int]):
        if self.prefetch and len(experts) > 1:
            room = max(0, self.cache.budget // max(1, self.cache.nbytes_of(self.layer)) - 1)
            self.cache.prefetch([(self.layer, e) for e in experts[1 : 1 + room]])

    @property
    def routes_in_kernel(self) -> bool:
        """A decode step may take its routing from the attention kernel (softmax top-k computed in C++ with the
        same ATen ops): nothing here needs the router's tensors."""
        return (self.gate.selects_like_kernel and self.elastic is None and self.shared is None
                and not self.observers and not self.output_observers and self._guess is None)

    def decode_routed(self, x: torch.Tensor, experts: list[int], w: torch.Tensor, residual: torch.Tensor):
        """residual + this block's output for x [1, H] routed to experts (ascending) with weights w [K] in the same
        order, as the attention kernel returns them."""
        return self._experts_sorted(x, experts, w, list(range(len(experts))), residual)

    def _experts_one_token(self, x: torch.Tensor, row: list[int], w: torch.Tensor) -> torch.Tensor:
        """Decode step: x [1, H], row = its K experts, w [K]. Same sums, in the same order, as experts()."""
        slots = sorted(range(len(row)), key=row.__getitem__)
        return self._experts_sorted(x, [row[k] for k in slots], w, slots)

    def _experts_sorted(self, x: torch.Tensor, experts: list[int], w: torch.Tensor, slots: list[int],
                        residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [1, H] through experts (ascending), expert i weighted by w[slots[i]]; (+ residual [1, H])."""
        self.cache.cancel_prefetches(self.layer, keep=set(experts))
        self._prefetch([e for e in experts if (self.layer, e) not in self.cache])
        keys = [(self.layer, e) for e in experts]
        held = self.cache.acquire_many(keys)
        self._pregate_next(x)
        try:
            if not self.output_observers and all(isinstance(ex, PreparedExpert) for ex in held):
                wl = w.tolist()
                out = experts_one_token(x, [ex.w13 for ex in held], [ex.w2 for ex in held], [wl[k] for k in slots],
                                        residual)
                if out is not None:
                    return out
            elif not self.output_observers and held and all(hasattr(ex, "down") for ex in held):  # QuantizedExpert
                wl = w.tolist()
                out = quantized_experts_one_token(x, [(ex.gate, ex.up, ex.down) for ex in held],
                                                  [wl[k] for k in slots], residual)
                if out is not None:
                    return out
            out = torch.zeros_like(x)  # [1, H]
            for k, e, ex in zip(slots, experts, held):
                h = ex.compute(x)  # [1, H]
                for obs in self.output_observers:
                    obs(self.layer, e, x, w[k : k + 1], h)
                out.add_((h * w[k]).to(out.dtype))
            return out if residual is None else residual + out
        finally:
            self.cache.release_many(keys)

    def _pregate_next(self, x: torch.Tensor):
        """x [1, H]: start reading the experts the next sparse layer's router would pick for x."""
        nxt = self.next
        if nxt is None or not (self.pregate and self.prefetch) or nxt.elastic is not None:
            return
        _, guess = nxt.gate(x)  # [1, K]
        nxt._guess = set(guess[0].tolist())
        self.cache.prefetch([(nxt.layer, e) for e in sorted(nxt._guess)], withdrawable=True)

    def _score_guess(self, indices: torch.Tensor):
        if indices.shape[0] == 1:
            self.cache.stats.count_guess(self._guess, set(indices[0].tolist()))
        self._guess = None
