"""One C++ call per decode token for a fully resident bf16 model (csrc/bf16_token.h): every layer's attention half
with its KV append, router, softmax top-k and routed experts, with the experts read from a table of every expert's
w13 and w2 in the expert cache; then the final norm and the lm_head (plain bf16 or the 12-bit form) as the model's
forward runs them. The same kernels as one attention_decode and one experts_one_token call per layer (model.py's
fused path), so hidden state, KV writes and logits are bit for bit theirs.

It applies where kernels/ggml_token.py's quantized twin does (every layer a GQA mixer with a routed MoE routed in
the kernel, no shared expert, observers, elastic routing or trace, every expert resident); the cache bookkeeping
(the lock, the stamp that drops the plan after an eviction, the hit count) is that module's TokenKernel.

Shape legend: H hidden, V vocab.
"""
from __future__ import annotations

import logging

import torch

from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.ggml_token import TokenKernel
from moepage.kernels.huge_pages import collapse_all
from moepage.paging.bf16_12bit import PackedMatrix

log = logging.getLogger("moepage.kernels")


def _plain(t) -> bool:
    return type(t) is torch.Tensor and t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()


class Bf16TokenKernel(TokenKernel):
    """decode(model, h, state, start, cos, sin, qk_norm_mode) -> logits [1, V], or None where the per-layer path
    must run."""

    def _head_fits(self, model) -> bool:
        return True  # the head runs in Python, whatever form the lm_head is held in

    def _build(self, model, qk_norm_mode: int):
        """The plan over the cache's current experts, or None when one is missing or not a plain bf16 expert."""
        cache, a = model.cache, model.args
        if model.dtype != torch.bfloat16 or len(cache._entries) < len(model.layers) * a.num_experts:
            return None
        plan = self.module.TokenPlan(a.rms_norm_eps, model.scale)
        for layer in model.layers:
            m, moe = layer.mixer, layer.moe
            w13, w2 = [], []
            for e in range(a.num_experts):
                entry = cache._entries.get((moe.layer, e))
                ex = entry.value if entry is not None else None
                if not (_plain(getattr(ex, "w13", None)) and _plain(getattr(ex, "w2", None))):
                    return None
                w13.append(ex.w13)
                w2.append(ex.w2)
            router = moe.router
            if not _plain(router) or router.shape[0] != a.num_experts:
                return None
            plan.add_layer(layer.attn_norm, layer.ffn_norm, m.q, m.k, m.v, m.o, m.q_bias, m.k_bias, m.v_bias,
                           m.o_bias, qk_norm_mode, m.q_norm, m.k_norm, a.head_dim, router, moe.routing.top_k,
                           moe.routing.norm_topk_prob, moe.routing.weights_in_logits_dtype, w13, w2)
        return plan

    def warm(self, model) -> int:
        """Once every expert is resident (after the engine's preload): huge pages under what a token reads, the
        lm_head (its 12-bit parts), the attention and router matrices and the expert cache's slots, in place
        (kernels/huge_pages.py, as ggml_token.py does for GGML weights). Returns the bytes now on huge pages."""
        cache = model.cache
        if self.refused or not self._fits(model) or len(cache._entries) < len(model.layers) * model.args.num_experts:
            return 0
        head = model.lm_head
        held = [head.lo, head.codes] if isinstance(head, PackedMatrix) else [head]
        for layer in model.layers:
            m = layer.mixer
            held += [t for t in (m.q, m.k, m.v, m.o, layer.moe.router) if _plain(t)]
        with cache._cond:
            held += [b for e in cache._entries.values() if (b := getattr(e.value, "buffer", None)) is not None]
            done = collapse_all(held)
        log.info("huge pages under %d MiB of resident weights", done >> 20)
        return done

    def decode(self, model, h: torch.Tensor, state, start: int, cos: torch.Tensor, sin: torch.Tensor,
               qk_norm_mode: int, head: bool = True) -> torch.Tensor | None:
        """h [1, H] at position start -> logits [1, V] (the last layer's output [1, H] when head is False), or None
        where this path does not apply."""
        out = super().decode(model, h, state, start, cos, sin, qk_norm_mode, head=False)
        if out is None or not head:
            return out
        x = model.rms_norm(out, model.norm, model.args.rms_norm_eps)  # as MoEModel.forward ends
        if isinstance(model.lm_head, PackedMatrix):
            return model.lm_head.linear(x, linear)
        return linear(x, model.lm_head)


class Bf16DecodeKernel:
    """model._decode_kernel for plain bf16 CPU weights: bf16_decode's attention_decode per layer, and decode_token,
    every layer of a resident model's token in one call."""

    def __init__(self, module):
        self.module = module
        self.attention_decode = module.attention_decode
        self.token = Bf16TokenKernel(module, {})

    def warm(self, model) -> int:
        """After the experts are read: huge pages under the resident weights."""
        return self.token.warm(model)

    def decode_token(self, model, h, state, start, cos, sin, qk_norm_mode):
        return self.token.decode(model, h, state, start, cos, sin, qk_norm_mode)
