"""One C++ call per decode token for a fully resident quantized GGUF (csrc/ggml_cpu_token.h): every layer's
attention half, router, softmax top-k and routed experts, the final norm and the lm_head, with the experts read
from a table of every expert's bytes in the expert cache; Python only embeds the token and samples. The same
arithmetic as one attention_decode and one experts_one_token call per layer (model.py's fused path), so the
hidden state is bit for bit theirs.

It applies when every layer is a GQA mixer with a routed MoE whose softmax top-k runs in the kernel (no observers,
elastic routing or trace; a shared expert of GGML matrices with an optional sigmoid gate, as Qwen2-MoE's, rides in
the same call), the lm_head is a GGML matrix ggml multiplies, and the expert cache holds every expert of every
layer; anything else (a cap, a prefill, a family block) takes the per-layer path. A table stays valid while the
cache evicts nothing: the call holds the cache's lock, so no read or eviction runs under it, and the table is
rebuilt (or dropped) once an eviction was counted.

Shape legend: H hidden, V vocab, L sparse layers, K experts per token.
"""
from __future__ import annotations

import logging
import time

import torch

from moepage.kernels.busy_threads import BusyThreads
from moepage.kernels.ggml import QuantizedTensor, ggml_backend
from moepage.kernels.huge_pages import collapse_all
from moepage.kernels.ggml_linear import GGMLWeight
from moepage.kernels.norm import rms_norm


log = logging.getLogger("moepage.kernels")


class TokenKernel:
    """decode(model, h, state, start, cos, sin) -> logits [1, V], or None where the per-layer path must run."""

    def __init__(self, module, weights: dict[int, tuple[torch.Tensor, int]]):
        self.module = module
        self.weights = weights  # id(weight tensor) -> (GGML bytes, type id), from QuantizedDecodeKernel
        self.plan = None
        self.stamp = None  # (evictions, entries, first entry's value) when the plan was built
        self.refused = False  # the model's shape never fits (checked once)
        self.busy = None  # BusyThreads over torch's thread count when the first token ran

    @staticmethod
    def _shared(moe, dtype: torch.dtype) -> list[tuple[torch.Tensor, int]] | None:
        """A block's shared expert as (GGML bytes, type id) for gate, up, down; [] when it has none; None when the
        kernel cannot run it (not GGML matrices ggml multiplies, or a gate that is not [1, H] of the model dtype)."""
        if moe.shared is None:
            return []
        b = ggml_backend()
        out = []
        for t in moe.shared:
            q = t.qweight if isinstance(t, GGMLWeight) else None
            if q is None or b is None or not b.multiplies(q.type.id) \
                    or q.shape[1] % b.activation_block(q.type.id):
                return None
            out.append((q.data.view(q.shape[0], -1), q.kernel_type))
        g = moe.shared_gate
        if g is not None and not (type(g) is torch.Tensor and g.dtype == dtype and g.dim() == 2 and g.shape[0] == 1):
            return None
        return out

    @staticmethod
    def _kernel_routes(moe) -> bool:
        """The block's softmax top-k may run in the kernel (SparseMoE.routes_in_kernel, a shared expert allowed)."""
        if moe.shared is None:
            return moe.routes_in_kernel
        return (moe.gate.selects_like_kernel and moe.elastic is None and not moe.observers
                and not moe.output_observers and moe._guess is None)

    def _fits(self, model) -> bool:
        a = model.args
        if model.rms_norm is not rms_norm or getattr(a, "final_logit_softcapping", None) is not None \
                or getattr(a, "layer_block", None) is not None or getattr(a, "expert_activation", "silu") != "silu" \
                or a.swiglu_limit is not None or a.sliding_window is not None \
                or not self._head_fits(model):
            return False
        for layer in model.layers:
            if layer.moe is None or getattr(layer, "block", None) is not None or layer.dense is not None \
                    or self._shared(layer.moe, model.dtype) is None:
                return False
        return True

    def _head_fits(self, model) -> bool:
        """The lm_head is a GGML matrix the plan multiplies (kernels/bf16_token.py's twin runs its head in Python)."""
        return isinstance(model.lm_head, GGMLWeight)

    def _routes_here(self, model) -> bool:
        """Per call: what may change while serving (observers, elastic routing, a trace recorder)."""
        return not model.cache.on_access and all(self._kernel_routes(layer.moe) and layer.moe.elastic is None
                                                 for layer in model.layers)

    def _stamp(self, cache, keys):
        e = cache._entries.get(keys[0]) if keys else None
        return cache.stats.evictions, len(cache._entries), e.value if e is not None else None

    def _build(self, model, qk_norm_mode: int):
        """The plan over the cache's current experts, or None when one is missing or not a GGML SwiGLU expert."""
        cache, a = model.cache, model.args
        if len(cache._entries) < len(model.layers) * a.num_experts:  # a cap: some expert is not resident
            return None
        lm = model.lm_head.qweight
        b = ggml_backend()
        if b is None or not b.multiplies(lm.type.id) or lm.shape[1] % b.activation_block(lm.type.id):
            return None
        plan = self.module.TokenPlan("float32" if model.dtype == torch.float32 else "bfloat16", a.rms_norm_eps,
                                     model.scale)
        w = self.weights
        for layer in model.layers:
            m, moe = layer.mixer, layer.moe
            experts = []
            for e in range(a.num_experts):
                entry = cache._entries.get((moe.layer, e))
                ex = entry.value if entry is not None else None
                if not all(isinstance(getattr(ex, p, None), QuantizedTensor) for p in ("gate", "up", "down")):
                    return None
                experts.append(ex)
            g0, u0, d0 = experts[0].gate, experts[0].up, experts[0].down
            types = (g0.kernel_type, u0.kernel_type, d0.kernel_type)
            if any((x.gate.kernel_type, x.up.kernel_type, x.down.kernel_type) != types for x in experts):
                return None
            router = getattr(moe.router, "weight", moe.router)
            r, tr = w[id(router)]
            plan.add_layer(layer.attn_norm, layer.ffn_norm, *w[id(m.q)], *w[id(m.k)], *w[id(m.v)], *w[id(m.o)],
                           m.q_bias, m.k_bias, m.v_bias, m.o_bias, qk_norm_mode, m.q_norm, m.k_norm,
                           a.head_dim, r, tr, moe.routing.top_k, moe.routing.norm_topk_prob,
                           moe.routing.weights_in_logits_dtype, [x.gate.data for x in experts],
                           [x.up.data for x in experts], [x.down.data for x in experts], *types, g0.shape[0])
            shared = self._shared(moe, model.dtype)
            if shared:
                plan.add_shared(*shared[0], *shared[1], *shared[2], moe.shared_gate)
        plan.set_head(model.norm, lm.data.view(lm.shape[0], -1), lm.kernel_type)
        return plan

    def warm(self, model) -> int:
        """Once every expert is resident (after the engine's preload): huge pages under everything a token reads,
        the lm_head, the attention and router matrices and the expert cache's slots (kernels/huge_pages.py: the
        same bytes, in place). Returns the bytes now on huge pages; 0 where this path does not apply."""
        cache = model.cache
        if self.refused or not self._fits(model) or len(cache._entries) < len(model.layers) * model.args.num_experts:
            return 0
        with cache._cond:
            slots = [getattr(e.value, "buffer", None) for e in cache._entries.values()]
            shared = [t for layer in model.layers for t, _ in self._shared(layer.moe, model.dtype)]
            held = [model.lm_head.qweight.data] + [t for t, _ in self.weights.values()] + shared + [
                b for b in slots if b is not None]
            done = collapse_all(held)
        log.info("huge pages under %d MiB of resident weights", done >> 20)
        return done

    def decode(self, model, h: torch.Tensor, state, start: int, cos: torch.Tensor, sin: torch.Tensor,
               qk_norm_mode: int, head: bool = True) -> torch.Tensor | None:
        """h [1, H] (the token's embedding) at position start, cos/sin [D] its RoPE rows -> logits [1, V] (or the
        last layer's output [1, H] when head is False); None where this path does not apply. qk_norm_mode as
        attention_decode takes it."""
        if self.refused:
            return None
        if not self._fits(model):
            self.refused = True
            return None
        if not self._routes_here(model):
            return None
        cache = model.cache
        keys = [(model.layers[0].moe.layer, 0)]
        with cache._cond:  # no read, eviction or clear while the kernel reads the experts' bytes
            if self.plan is None or self._stamp(cache, keys) != self.stamp:
                self.plan = self._build(model, qk_norm_mode)
                self.stamp = self._stamp(cache, keys)
            if self.plan is None:
                return None
            kv = [state[i] for i in range(len(model.layers))]
            out, chosen = self._timed(self.plan.decode, h.contiguous(), [x.keys for x in kv],
                                      [x.values for x in kv], cos, sin, start, head)
            with cache.stats.lock:
                cache.stats.hits += len(chosen)
        state.length = start + 1
        return out

    def _timed(self, call, *args):
        """call(*args) at the thread count BusyThreads picks (torch's count restored after), its wall and the process's
        CPU time recorded."""
        most = torch.get_num_threads()
        if self.busy is None or self.busy.most != most:
            self.busy = BusyThreads(most)
        n = self.busy.next()
        if n != most:
            torch.set_num_threads(n)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return call(*args)
        finally:
            self.busy.record(n, time.perf_counter() - t0, time.process_time() - c0)
            if n != most:
                torch.set_num_threads(most)
