"""Layer-major prefill of a long prompt under a memory budget: every chunk of the prompt through layer 0, then every
chunk through layer 1, and so on, so each routed expert is read from disk once per layer for the whole prompt
instead of once per chunk (a 2,048-token prompt in 512-token chunks routes every chunk to nearly every expert of
every layer: chunk by chunk, a cache smaller than the model reads the whole expert set once per chunk).

Exact: each chunk goes through the same operations on the same inputs as MoEModel.forward chunk by chunk (the
same chunk boundaries, the same attention over the same keys, the same SparseMoE call), only in another order, so
the logits and the KV cache are bit for bit those of the chunk-by-chunk prefill, at any budget. Per layer:
attention for every chunk, then the routers of every chunk, which give the layer's exact expert set for the whole
span: it is prefetched in ascending order, then the next layer's experts as this layer's inputs route through the
next router (what pre-gating guesses during decode), so the next layer's reads overlap this layer's expert compute.

The span's activations (hidden state and FFN input of every token, the router logits) are taken out of the expert
cache's budget while the span runs, so the span is as long as what the budget leaves allows.

Shape legend: T tokens in a chunk, S tokens in the span, H hidden, E experts, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moepage.engine.kv_cache import ContextOverflow
from moepage.engine.model import MoEModel
from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.experts import swiglu
from moepage.paging.bf16_12bit import PackedMatrix


def span_bytes_per_token(model: MoEModel) -> int:
    """Bytes one prompt token holds across a layer-major span: its hidden state and FFN input ([H] each, in the
    compute dtype), its router logits (float32 [E]) and its routing (K weights and indices)."""
    a = model.args
    size = torch.empty(0, dtype=model.dtype).element_size()
    return 2 * a.hidden_size * size + 4 * a.num_experts + 12 * a.top_k


def _chunk_end(engine, ids: list[int], start: int) -> tuple[int, bool]:
    """Where the prefill chunk from start ends and whether that end is fixed by the tokens (Sequence's own rule)."""
    chunks = getattr(engine, "chunks", None)  # engine/prompt_cache.py ChunkSchedule
    if chunks is not None:
        return chunks.end(ids, start)
    c = max(1, engine.cfg.prefill_chunk)
    return min(start + c, len(ids)), start + c <= len(ids)


def fits(model: MoEModel, span: int) -> bool:
    """The model is plain (positional layers only, no routing observers or elastic modes) and the expert cache holds
    two layers' experts besides a span of `span` tokens' activations."""
    if len(model.kv_slots) != len(model.layers):  # a recurrent layer's state is marked per chunk (prompt cache)
        return False
    blocks = model.moe_blocks
    if not blocks or any(b.observers or b.output_observers or b.elastic is not None for b in blocks):
        return False
    layer_bytes = max(model.cache.nbytes_of(b.layer) for b in blocks) * model.args.num_experts
    return 2 * layer_bytes + span * span_bytes_per_token(model) <= model.cache.budget


def prefill_span(engine, slot, ids: list[int], start: int) -> tuple[int, torch.Tensor] | None:
    """Under a memory budget, run the prompt's chunks from `start` layer-major, as far as the next 1-token chunk
    (MoEModel.forward runs one token through the decode path) or the prompt's end, and update the slot as that many
    chunk-by-chunk steps would: (end, logits [1, V] of the token before end). None where chunk by chunk applies:
    every expert resident, fewer than two chunks left, or a model or budget `fits` refuses."""
    if engine.plan.fraction_resident >= 1.0:
        return None
    bounds, p = [], start
    while p < len(ids):
        end, fixed = _chunk_end(engine, ids, p)
        if end - p < 2:
            break
        bounds.append((p, end, fixed))
        p = end
    if len(bounds) < 2 or not fits(engine.model, p - start):
        return None
    logits = prefill_layer_major(engine.model, torch.tensor(ids[start:p]), slot.kv, start,
                                 [(a - start, b - start) for a, b, _ in bounds])
    slot.kv_ids = list(ids[:p])
    fixed = [b for _, b, f in bounds if f]
    if fixed:  # the last chunk end a longer prompt's prefill also reaches
        slot.exact_ids = list(ids[: fixed[-1]])
        slot.kv.mark(fixed[-1])
    return p, logits


@torch.inference_mode()
def prefill_layer_major(model: MoEModel, tokens: torch.Tensor, state, start: int, bounds: list[tuple[int, int]]
                        ) -> torch.Tensor:
    """tokens [S] at positions start..start+S, in chunks tokens[a:b] for (a, b) in bounds -> logits [1, V] of the
    last token; the same values and KV cache as MoEModel.forward over each chunk in turn."""
    a, cache = model.args, model.cache
    n = tokens.shape[0]
    if start + n > state.max_tokens:
        raise ContextOverflow(start + n, state.max_tokens)
    hs = []  # per chunk [T, H]
    for s, e in bounds:
        part = tokens[s:e]
        hs.append(model.embed_rows(part) if model.embed_rows is not None
                  else F.embedding(part.to(model.device), model.embed))
    budget = cache.budget
    cache.resize(budget - n * span_bytes_per_token(model))  # the span's activations come out of the expert cache
    try:
        for i, layer in enumerate(model.layers):
            for c, (s, _) in enumerate(bounds):
                r = model.rms_norm(hs[c], layer.attn_norm, a.rms_norm_eps)
                hs[c] = hs[c] + layer.mixer.forward(r, state[i], start + s)
            rs = [model.rms_norm(h, layer.ffn_norm, a.rms_norm_eps) for h in hs]
            moe = layer.moe
            if moe is None:
                hs = [h + swiglu(r, *layer.dense) for h, r in zip(hs, rs)]
                continue
            logits = [moe.gate.logits(r) for r in rs]  # [T, E] each, as SparseMoE.__call__ computes them
            if moe.prefetch:  # this layer's exact set, ascending, then the next layer's guess
                needed = sorted({e for lg in logits for e in moe.gate.select(lg)[1].unique().tolist()})
                keys = [(moe.layer, e) for e in needed]
                cache.prefetch(keys)
                cache.touch(keys)  # what the next layer's reads evict first: earlier layers, not this one
                _prefetch_next(moe, rs, cache)
            hs = [h + moe(r, logits=lg) for h, r, lg in zip(hs, rs, logits)]
    finally:
        cache.resize(budget)
    state.length = start + n
    h = model.rms_norm(hs[-1][-1:], model.norm, a.rms_norm_eps)  # [1, H], as MoEModel.forward ends
    if isinstance(model.lm_head, PackedMatrix):
        return model.lm_head.linear(h, linear)
    return linear(h, model.lm_head)  # [1, V]


def _prefetch_next(moe, rs: list[torch.Tensor], cache):
    """Start reading the experts the next sparse layer's router picks for this layer's FFN inputs rs (its real
    inputs differ by this layer's output: a guess, read after this layer's own experts)."""
    nxt = moe.next
    if nxt is None or nxt.elastic is not None:
        return
    guess = set()
    for r in rs:
        guess.update(nxt.gate(r)[1].unique().tolist())
    cache.prefetch([(nxt.layer, e) for e in sorted(guess)])
