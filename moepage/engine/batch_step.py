"""One decode step for several sequences at once (--parallel): each sequence's attention on its own KV cache, then,
layer by layer, every routed expert any of them picked is read once (prefetched together, held while all rows
use it) and applied to all the rows that picked it in one call, and the lm_head multiplies all rows in one pass.
Those calls are the row-invariant kernels of csrc/bf16_rows.h: every weight row is read from memory once for all
rows, and each row's sums are the one-row kernels' own (they call the same dot), so a sequence's logits are bit for
bit the ones it would get alone (tests/test_parallel_decode.py, tests/test_bf16_rows.py). Where those kernels do not
apply (plain torch, quantized GGUF experts, a shared expert, an elastic or observed router) the rows go one at a
time through the one-row path, as a sequence alone does.

Shape legend: B sequences in the step, H hidden, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moepage.engine.kv_cache import ContextOverflow, KVCache
from moepage.engine.model import QK_NORM_MODE, MoEModel
from moepage.engine.moe import PreparedExpert
from moepage.kernels.bf16_rows import attention_kernel, experts_rows, lm_head_rows
from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.experts import swiglu
from moepage.kernels.norm import rms_norm
from moepage.paging.bf16_12bit import PackedMatrix


def _fused_ok(model: MoEModel, kv: KVCache) -> bool:
    """Whether model.forward would take the fused one-kernel-per-layer path for one token appended to kv."""
    window = model.args.sliding_window
    return model._decode_kernel is not None and (window is None or kv.length < window)


@torch.inference_mode()
def decode_step(model: MoEModel, tokens: list[int], kvs: list[KVCache]) -> list[torch.Tensor]:
    """tokens[b] appended to kvs[b] (each at its own position) -> logits [V] for each sequence."""
    if len(tokens) != len(kvs):
        raise ValueError("one KV cache per token")
    out: list[torch.Tensor | None] = [None] * len(tokens)
    fused = [b for b, kv in enumerate(kvs) if _fused_ok(model, kv)]
    if len(fused) < 2:
        fused = []
    for b in range(len(tokens)):  # what the fused path does not cover runs alone, as it would anyway
        if b not in fused:
            out[b] = model.forward(torch.tensor([tokens[b]]), kvs[b])[-1]
    if fused:
        for b, logits in zip(fused, _fused_rows(model, [tokens[b] for b in fused], [kvs[b] for b in fused])):
            out[b] = logits
    return out


def _fused_rows(model: MoEModel, tokens: list[int], kvs: list[KVCache]) -> list[torch.Tensor]:
    a = model.args
    for kv in kvs:
        if kv.length >= kv.max_tokens:
            raise ContextOverflow(kv.length + 1, kv.max_tokens)
    hs = []
    for t in tokens:  # [1, H] each, as model.forward embeds a one-token step
        ids = torch.tensor([t])
        hs.append(model.embed_rows(ids) if model.embed_rows is not None else
                  F.embedding(ids.to(model.device), model.embed))
    starts = [kv.length for kv in kvs]
    rope = [tuple(t[0] for t in model.rope.get(s, 1)) for s in starts]
    rows_kernel = attention_kernel(model)  # all rows' attention halves in one call, else one call a row
    for i, layer in enumerate(model.layers):
        moe = layer.moe
        router = moe.router if moe is not None and moe.elastic is None else None
        top_k = moe.routing.top_k if router is not None and moe.routes_in_kernel else 0
        m = layer.mixer  # a GQA mixer (the fused path runs only where every layer's is)
        routing = (moe is not None and moe.routing.norm_topk_prob, moe is not None and moe.routing.weights_in_logits_dtype)
        if rows_kernel is not None:  # every row's [1, H] residual, [1, H] FFN input, router logits, experts, weights
            halves = rows_kernel.attention_rows(
                torch.cat(hs), layer.attn_norm, layer.ffn_norm, a.rms_norm_eps, m.q, m.k, m.v, m.o, m.q_bias,
                m.k_bias, m.v_bias, m.o_bias, QK_NORM_MODE[a.qk_norm], m.q_norm, m.k_norm, [c for c, _ in rope],
                [s for _, s in rope], [kv[i].keys for kv in kvs], [kv[i].values for kv in kvs], starts, model.scale,
                router, top_k, *routing)
        else:
            halves = [model._decode_kernel.attention_decode(
                hs[b], layer.attn_norm, layer.ffn_norm, a.rms_norm_eps, m.q, m.k, m.v, m.o, m.q_bias, m.k_bias,
                m.v_bias, m.o_bias, QK_NORM_MODE[a.qk_norm], m.q_norm, m.k_norm, *rope[b], kv[i].keys, kv[i].values,
                starts[b], model.scale, router, top_k, *routing) for b, kv in enumerate(kvs)]
        if moe is None:
            hs = [h + swiglu(r, *layer.dense) for h, r, *_ in halves]
            continue
        if top_k:
            picked = [list(experts) for _, _, _, experts, _ in halves]
        elif moe.elastic is None:
            picked = [moe.gate.select(logits)[1][0].tolist() for _, _, logits, _, _ in halves]
        else:
            picked = None  # an elastic hook may keep state per call: each row asks it once, below
        for group in _groups(moe, picked, len(halves)):
            keys = sorted({(moe.layer, e) for b in group for e in (picked[b] if picked else ())})
            held = keys and moe.cache.acquire_many(_prefetched(moe, keys))
            try:
                out = _routed_rows(moe, group, halves, keys, held) if top_k else None
                if out is not None:
                    for j, b in enumerate(group):
                        hs[b] = out[j : j + 1]
                    _count_row_accesses(moe.cache, sum(len(halves[b][3]) for b in group) - len(keys))
                    continue
                for b in group:
                    h, r, logits, experts, weights = halves[b]
                    hs[b] = moe.decode_routed(r, experts, weights, h) if top_k else h + moe(r, logits=logits)
                if held:
                    _count_row_accesses(moe.cache, -len(keys))
            finally:
                if held:
                    moe.cache.release_many(keys)
    for kv, s in zip(kvs, starts):
        kv.length = s + 1
    head = model.lm_head
    normed = [rms_norm(h, model.norm, a.rms_norm_eps) for h in hs]  # [1, H] each
    together = lm_head_rows(torch.cat(normed), head)  # [B, V], or None: one row at a time
    logits = [together[b] if together is not None else
              (head.linear(h, linear) if isinstance(head, PackedMatrix) else linear(h, head))[-1]
              for b, h in enumerate(normed)]
    if a.final_logit_softcapping is not None:  # as model.forward caps a sequence's logits alone
        cap = a.final_logit_softcapping
        logits = [torch.tanh(v / cap) * cap for v in logits]
    return logits


def _routed_rows(moe, group: list[int], halves, keys, held) -> torch.Tensor | None:
    """The group's rows through their routed experts in one call (each expert's weights read once for all rows that
    picked it): [len(group), H] = residual + experts, row by row what decode_routed gives it alone; None where
    decode_routed would not take the bf16 kernel (or pre-gating wants each row's input)."""
    if not held or not all(type(ex) is PreparedExpert for ex in held):
        return None
    if moe.output_observers or (moe.next is not None and moe.pregate and moe.prefetch):
        return None
    where = {e: u for u, (_, e) in enumerate(keys)}
    picks = [[where[e] for e in halves[b][3]] for b in group]  # each row's experts, ascending, as the kernel routed
    weights = [halves[b][4].tolist() for b in group]
    return experts_rows(torch.cat([halves[b][1] for b in group]), [ex.w13 for ex in held], [ex.w2 for ex in held],
                        picks, weights, torch.cat([halves[b][0] for b in group]))


def _count_row_accesses(cache, n: int):
    """The group's acquire_many pinned its experts for its rows and counted each once, as a hit or a miss. A sequence
    decoded alone counts each of its experts once per layer: add the n accesses that makes up (rows x top-k per
    layer minus the group's pins, as hits: the experts are held), or take the group's pins back out (n < 0) when
    every row acquired its own experts again, so that hits + misses = rows x top-k per layer and misses = reads."""
    with cache.stats.lock:
        cache.stats.hits += n


def _prefetched(moe, keys: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Start the reads of keys not resident on the page-in threads (acquire_many then waits on them together)."""
    missing = [k for k in keys if k not in moe.cache]
    if moe.prefetch and len(missing) > 1:
        moe.cache.prefetch(missing[1:])
    return keys


def _groups(moe, picked: list[list[int]] | None, rows: int) -> list[list[int]]:
    """Rows in order, split so that the experts each group holds at once fit the expert cache."""
    if picked is None:
        return [[b] for b in range(rows)]
    room = max(1, moe.cache.budget // max(1, moe.cache.nbytes_of(moe.layer)))
    groups: list[list[int]] = []
    union: set[int] = set()
    for b in range(rows):
        if groups and len(union | set(picked[b])) <= room:
            groups[-1].append(b)
            union |= set(picked[b])
        else:
            groups.append([b])
            union = set(picked[b])
    return groups
