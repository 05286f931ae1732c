"""One request's generation as a state machine the scheduler can interleave with others': its slot (KV cache and
the tokens it holds), prefill chunk by chunk, then sample / feed one token at a time.

Engine.generate runs one Sequence to its end; the server's scheduler (server/worker.py) runs up to --parallel of
them, one prefill chunk or one batched decode step (engine/batch_step.py) at a time. The chunks, the kernels and
the sampling are the same either way, so a sequence's tokens do not depend on what runs beside it.

Shape legend: V vocab.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moepage.engine.kv_cache import KVCache
from moepage.engine.layered_prefill import prefill_span
from moepage.engine.sampling import Sampler, SamplingParams, StopMatcher
from moepage.engine.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from moepage.engine.engine import Engine, GenerationStats, StepOutput


@dataclass
class Slot:
    """A sequence's state: its KV cache and the tokens it holds (kv_ids), of which exact_ids is the prefix whose
    state a fresh prefill would give bit for bit (what the prompt cache may re-use)."""

    kv: KVCache
    kv_ids: list[int] = field(default_factory=list)
    exact_ids: list[int] = field(default_factory=list)
    last_used: float = 0.0
    # a finished reply's tokens (prompt + generated, to its last fixed chunk end) that settle() prefills into the
    # exact state while the engine is idle, so the next turn re-uses the reply too; None: nothing to settle
    settle_ids: list[int] | None = None
    busy: bool = False  # a Sequence runs in it (a failed step leaves kv_ids and exact_ids true: the model writes
    # positions from len(kv_ids) on, and the ids grow only after a step succeeded)


class Sequence:
    def __init__(self, engine: "Engine", slot: Slot, prompt_ids: list[int], params: SamplingParams):
        from moepage.engine.engine import GenerationStats

        self.engine, self.slot, self.prompt_ids, self.params = engine, slot, list(prompt_ids), params
        slot.settle_ids = None  # this sequence overwrites what the slot held past its exact prefix
        self.stats: GenerationStats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.t0 = time.perf_counter()
        self.pos: int | None = None  # next prompt position to prefill; None before the prompt cache was asked
        self.logits: torch.Tensor | None = None  # [V] of the last position, to sample from next
        self.pending: int | None = None  # the sampled token the next decode step feeds
        self.finished = False
        self.n = 0  # tokens generated
        self.max_new = min(params.max_tokens or engine.ctx_size, engine.ctx_size - len(prompt_ids))
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else engine.eos_ids)
        self.stops = StopMatcher([s for s in params.stop if s])  # holds back text that may begin a stop string
        tk = engine.tokenizer
        self.detok = IncrementalDetokenizer(tk, prompt_ids) if tk else None
        self.sampler: Sampler | None = None
        self.t_decode: float | None = None
        self.last: int | None = None  # the last sampled token (a stop token is never fed)

    @property
    def prefilling(self) -> bool:
        return self.logits is None and self.pending is None and not self.finished

    # ---- prefill ------------------------------------------------------------------------------------------------
    def prefill_chunk(self, alone: bool = True) -> bool:
        """Run the next prompt chunk (the first call re-uses the longest cached prefix); True once the prompt is in
        and logits are ready to sample. alone: no other sequence is waiting to decode, so under a budget the rest of
        the prompt may run layer-major in one call (same logits); otherwise one chunk, so the others step between."""
        e, slot, ids = self.engine, self.slot, self.prompt_ids
        if self.pos is None:
            start = 0
            if e.prompt_cache is not None:  # at a fixed chunk end: the chunks below are those a fresh prefill runs
                start = e.prompt_cache.begin(slot.kv, slot.exact_ids, ids)
            start = slot.kv.rewind(start)  # recurrent layers: back to a state they hold (0 without a prompt cache)
            slot.kv_ids = list(ids[:start])
            slot.exact_ids = list(ids[:start])
            self.stats.cached_prompt_tokens = start
            self.pos = start
        s = self.pos
        span = prefill_span(e, slot, ids, s) if alone else None  # under a budget: layer by layer (layered_prefill.py)
        if span is not None:
            end, logits = span
        else:
            end, fixed = e.chunks.end(ids, s)  # engine/prompt_cache.py ChunkSchedule
            logits = e.model.forward(torch.tensor(ids[s:end]), slot.kv, start=s)
            slot.kv_ids = list(ids[:end])
            if fixed:  # exactly what a longer prompt's prefill computes here
                slot.exact_ids = list(slot.kv_ids)
                mark(e, slot, ids, end)
        self.pos = end
        if self.pos < len(ids):
            return False
        self.logits = logits[-1]
        self.stats.prefill_seconds = time.perf_counter() - self.t0
        self.sampler = Sampler(self.params, ids, self.logits.shape[-1])
        return True

    # ---- decode -------------------------------------------------------------------------------------------------
    def sample(self) -> "StepOutput":
        """The next output from the pending logits; sets `pending` (the token to feed) unless the sequence ends."""
        from moepage.engine.engine import StepOutput

        stats = self.stats
        choice = self.sampler(self.logits)
        self.logits = None
        self.last = choice.token
        now = time.perf_counter()
        if self.t_decode is None:
            self.t_decode = now
        stats.token_times.append(now)
        if stats.first_token_time is None:
            stats.first_token_time = now - self.t0
        stats.completion_tokens += 1
        self.n += 1
        if choice.token in self.stop_ids:
            return self._end(StepOutput(choice.token, self.stops.pending, choice.logprob, choice.top, "stop"))
        text = self.detok.push(choice.token) if self.detok else ""
        emit, hit = self.stops.push(text)
        if hit:
            return self._end(StepOutput(choice.token, emit, choice.logprob, choice.top, "stop"))
        if self.n >= self.max_new:
            if self.detok:
                emit += self.stops.pending + self.detok.flush()
            return self._end(StepOutput(choice.token, emit, choice.logprob, choice.top, "length"))
        self.pending = choice.token
        return StepOutput(choice.token, emit, choice.logprob, choice.top, None)

    def feed(self, logits: torch.Tensor):
        """logits [V] after the pending token went through the model."""
        self.slot.kv_ids.append(self.pending)
        self.pending = None
        self.logits = logits

    def _end(self, out):
        self.finish()
        return out

    def finish(self):
        """Stop (end of output, cancellation or error): the decode time is counted, the slot is free again."""
        if self.finished:
            return
        self.finished = True
        self.pending = None
        if self.t_decode is not None:
            self.stats.decode_seconds = time.perf_counter() - self.t_decode
        self._keep_reply()
        self.slot.busy = False
        self.slot.last_used = time.perf_counter()

    def _keep_reply(self):
        """With a prompt cache: the slot will settle the generated tokens as a prefill of prompt + reply computes
        them, up to that prompt's last fixed chunk end (an end-of-turn token closing the reply)."""
        e, slot = self.engine, self.slot
        if e.prompt_cache is None or self.last is None or self.pos is None or self.pos < len(self.prompt_ids):
            return
        ids = slot.kv_ids + [self.last]  # the prompt, the fed tokens, the last (unfed) one
        end = e.chunks.exact_end(ids, len(ids))
        if end > len(slot.exact_ids):
            slot.settle_ids = ids[:end]


def mark(engine: "Engine", slot: Slot, ids: list[int], end: int):
    """The slot's state is the one after ids[:end], a fixed chunk end: the prompt cache keeps copies of recurrent
    layers at a few such ends (prompt_cache.PromptCache.mark), else the state keeps the newest."""
    if engine.prompt_cache is not None:
        engine.prompt_cache.mark(slot.kv, ids, end)
    else:
        slot.kv.mark(end)


def settle(engine: "Engine") -> bool:
    """Idle work: one prefill chunk of some free slot's finished reply (Slot.settle_ids) from its exact prefix on,
    the chunk a fresh prefill of those tokens runs there, so the state stays exact. False when there is none.
    The caller holds engine.lock."""
    slot = next((s for s in engine.slots if s.settle_ids is not None and not s.busy), None)
    if slot is None:
        return False
    ids, s = slot.settle_ids, len(slot.exact_ids)
    try:
        if slot.kv.rewind(s) != s:  # the state after the exact prefix is gone (it is marked: not expected)
            slot.kv_ids, slot.exact_ids, slot.settle_ids = [], [], None
            return True
        end, fixed = engine.chunks.end(ids, s)
        slot.kv_ids = list(ids[:s])  # until the chunk is in: a failed step leaves the slot true
        engine.model.forward(torch.tensor(ids[s:end]), slot.kv, start=s)
        slot.kv_ids = list(ids[:end])
        engine.prompt_cache.stats.settled_tokens += end - s
        if fixed:
            slot.exact_ids = list(slot.kv_ids)
            mark(engine, slot, ids, end)
    except Exception:
        slot.settle_ids = None
        raise
    if end >= len(ids) or not fixed:
        slot.settle_ids = None
    return True
