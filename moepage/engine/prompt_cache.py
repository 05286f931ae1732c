"""Prompt cache: the states of recent sequences, so that a request re-uses the longest cached prefix of its tokens.

Re-use is exact. A prefill runs its prompt in chunks, and the rounding of a chunk depends on its shape and on every
token in it (matmul blocking by row count, the batch each expert gathers, the attention path). Where the chunks
end is therefore fixed by the tokens alone (ChunkSchedule): a chunk ends after C tokens or right after a token
that closes a message (the model's end-of-turn ids, ChatML's <|im_end|>), whichever comes first, so each end
depends only on the tokens before it and two prompts with a common prefix are cut the same way inside it. A state
is re-used up to the last such end in the common prefix: the continued prefill then runs exactly the chunks a
fresh prefill of the new prompt would, and the same greedy tokens follow. An agent's next turn repeats its
previous prompt and adds messages, so it re-uses that prompt up to its last closed message (all but the few
tokens of the generation prompt). What a re-used prefix cannot give: a prompt's tail after its last chunk end
(a chunk cut short by the prompt's end is not what a longer prompt computes there) and generated tokens (decoded
one at a time) are computed again.

A sequence's state (SequenceState: KVCache today; per-layer states such as Gated DeltaNet's conv + recurrent state
or a sliding layer's last window - 1 keys and values through LayerStates) offers nbytes, mark(length),
snapshot(length), restore(snapshot, length) and rewind(length); the last two return the length they could go back to
(a recurrent state only to a marked one, or 0). A recurrent state keeps copies at its last few marks (PromptCache.mark
picks which: message ends first), and a snapshot carries them, so a prompt sent again (a retry, "regenerate") or one
whose last user message was edited goes back to an earlier chunk end: re-use needs one token left to prefill, and a
settled reply's end is past the prompt. Every copy beyond each live state's newest counts in the cache's bytes.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, Sequence


class StateSnapshot(Protocol):
    length: int  # tokens the snapshot holds the state after

    @property
    def nbytes(self) -> int: ...


class SequenceState(Protocol):
    length: int

    def mark(self, length: int) -> None:
        """Called when the state is the one after `length` tokens: a state that cannot be rewound keeps a copy."""

    def snapshot(self, length: int) -> StateSnapshot: ...

    def restore(self, snap: StateSnapshot, length: int) -> int:
        """The state after the snapshot's first `length` tokens, or as many as it can give; returns that count."""

    def rewind(self, length: int) -> int:
        """The state after its own first `length` tokens, or as many as it can give; returns that count."""


# Special tokens that close a chat message: ChatML, Harmony (gpt-oss: <|end|>; its replies end with <|return|> or
# <|call|>, eos ids), Gemma, Gemma 4, Llama 3.
MESSAGE_ENDS = ("<|im_end|>", "<|end|>", "<end_of_turn>", "<turn|>", "<|eot_id|>")


def message_end_ids(tokenizer) -> frozenset[int]:
    """The ids of MESSAGE_ENDS in this tokenizer's vocabulary (none without a tokenizer)."""
    if tokenizer is None:
        return frozenset()
    return frozenset(i for t in MESSAGE_ENDS if (i := tokenizer.token_to_id(t)) is not None)


@dataclass(frozen=True)
class ChunkSchedule:
    """Where a prefill's chunks end: after `chunk` tokens or right after a token in `ends`, whichever is first."""

    chunk: int
    ends: frozenset[int] = frozenset()

    def __post_init__(self):
        if self.chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1 token, got {self.chunk}")

    def end(self, ids: Sequence[int], start: int) -> tuple[int, bool]:
        """(where the chunk from start ends, whether that end is fixed by the tokens before it: False for a chunk
        cut short by the end of ids, which a longer prompt with the same prefix would continue)."""
        stop = min(start + self.chunk, len(ids))
        if self.ends:
            for p in range(start, stop):
                if ids[p] in self.ends:
                    return p + 1, True
        return stop, stop == start + self.chunk

    def exact_end(self, ids: Sequence[int], limit: int) -> int:
        """The last fixed chunk end of ids at or before limit (0 if none)."""
        s = 0
        while s < len(ids):
            e, fixed = self.end(ids, s)
            if e > limit or not fixed:
                break
            s = e
        return s


@dataclass
class PromptCacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that re-used at least one token
    reused_tokens: int = 0  # prompt tokens whose state came from the cache
    computed_tokens: int = 0  # prompt tokens prefilled
    settled_tokens: int = 0  # generated tokens prefilled again while idle, so the next turn re-uses them exactly
    stored: int = 0
    evictions: int = 0


@dataclass
class CachedPrompt:
    ids: tuple[int, ...]  # the tokens the snapshot holds the exact state after
    snapshot: StateSnapshot


def reach(state, length: int) -> int:
    """How many of its first `length` tokens a state or snapshot can go back to exactly (a KV cache: any)."""
    f = getattr(state, "reach", None)
    return f(length) if f is not None else min(length, state.length)


def covers(a: StateSnapshot, b: StateSnapshot) -> bool:
    """Whether snapshot a restores every length that b restores (b's tokens a prefix of a's)."""
    return all(reach(a, m) == m for m in getattr(b, "restorable", (b.length,)))


class PromptCache:
    """Snapshots of earlier sequences in LRU order, within capacity_bytes, plus the live sequence the engine holds
    (its state object: re-used in place, stashed here only when another prompt is about to overwrite it).
    keep_marks: how many chunk ends a live recurrent state keeps copies at (the newest, then message ends, then
    the most recent); the copies beyond each live state's newest count in capacity_bytes like the snapshots, and
    give way after them. Used by the engine's thread only; snapshot_stats reads counters (no lock: /metrics never
    waits on a copy)."""

    def __init__(self, capacity_bytes: int, chunks: ChunkSchedule | int, keep_marks: int = 4):
        if capacity_bytes < 0:
            raise ValueError(f"prompt cache bytes must be >= 0, got {capacity_bytes}")
        if keep_marks < 1:
            raise ValueError(f"a state keeps at least its newest mark, got keep_marks={keep_marks}")
        self.capacity = int(capacity_bytes)
        self.keep_marks = int(keep_marks)
        self.schedule = chunks if isinstance(chunks, ChunkSchedule) else ChunkSchedule(int(chunks))
        self.entries: OrderedDict[int, CachedPrompt] = OrderedDict()  # key: id(entry); oldest first
        self.live: weakref.WeakSet = weakref.WeakSet()  # the states with marks (LayerStates) begin/mark saw
        self.stats = PromptCacheStats()
        self.nbytes = 0  # of the snapshots held and the live states' older marks

    def _add(self, entry: CachedPrompt):
        self.entries[id(entry)] = entry

    def _drop(self, key: int) -> CachedPrompt:
        return self.entries.pop(key)

    def _bytes(self) -> int:
        """The snapshots' bytes plus the live states' marked copies, each copy once (a snapshot shares the copies
        of the state it was taken from), less each live state's newest mark (the state's own, as without a cache)."""
        copies: dict[int, int] = {}
        total = 0
        for e in self.entries.values():
            total += getattr(e.snapshot, "positional_nbytes", e.snapshot.nbytes)
            copies |= {id(c): c.nbytes for c in getattr(e.snapshot, "copies", list)()}
        free = set()
        for s in self.live:
            copies |= {id(c): c.nbytes for c in s.copies()}
            free |= {id(c) for c in s.copies(newest=True)}
        return total + sum(n for k, n in copies.items() if k not in free)

    def _fit(self):
        """Evict the least recently used snapshots, then the live states' oldest marks, to the capacity."""
        while (n := self._bytes()) > self.capacity:
            if self.entries:
                self._drop(next(iter(self.entries)))
                self.stats.evictions += 1
                continue
            older = [(m, s) for s in self.live for m in s.marks[:-1]]
            if not older:
                break
            m, s = min(older, key=lambda t: t[0])
            s.forget(m)
        self.nbytes = n

    def mark(self, state: SequenceState, ids: Sequence[int], length: int):
        """The state is the one after ids[:length] (a fixed chunk end): mark it, keeping copies at up to keep_marks
        chunk ends (the newest; then those right after a message end, a prompt's likely branch points; then the
        most recent), within the capacity."""
        marks = getattr(state, "marks", None)
        if marks is None:  # positional layers only: nothing to copy
            state.mark(length)
            return
        older = [m for m in marks if m < length]
        ranked = sorted(older, key=lambda m: (m <= len(ids) and ids[m - 1] in self.schedule.ends, m), reverse=True)
        state.mark(length, keep=frozenset(ranked[: self.keep_marks - 1]))
        self.live.add(state)
        self._fit()

    def reusable(self, cached: Sequence[int], ids: Sequence[int]) -> int:
        """Tokens of ids a state after `cached` (which ends at a fixed chunk end) serves exactly: their common
        prefix, down to a fixed chunk end of ids, and at least one token left to prefill (the last logits)."""
        n = min(len(cached), len(ids) - 1)
        i = 0
        while i < n and cached[i] == ids[i]:
            i += 1
        return self.schedule.exact_end(ids, i)

    def begin(self, state: SequenceState, live: Sequence[int], ids: Sequence[int]) -> int:
        """Before prefilling ids: put the best state into `state` (live holds the tokens whose exact state it has
        now) and return how many leading tokens need no prefill."""
        self.stats.lookups += 1
        if getattr(state, "marks", None) is not None:
            self.live.add(state)
        start = reach(state, self.reusable(live, ids))  # a recurrent state: the largest mark within the prefix
        best, best_n = None, start
        for e in self.entries.values():
            if (n := reach(e.snapshot, self.reusable(e.ids, ids))) > best_n:
                best, best_n = e, n
        if best is not None:
            self._drop(id(best))  # it becomes the live state
            self._stash(state, live)
            start = state.restore(best.snapshot, best_n)
        else:
            if not self._kept(live, ids):  # the prefill overwrites what only the live state holds
                self._stash(state, live)
            start = state.rewind(start)
        self._fit()
        self.stats.hits += start > 0
        self.stats.reused_tokens += start
        self.stats.computed_tokens += len(ids) - start
        return start

    def _kept(self, live: Sequence[int], ids: Sequence[int]) -> bool:
        """Whether the live state is still exact for `live` after ids is prefilled into it."""
        return tuple(ids[: len(live)]) == tuple(live) and len(live) <= self.schedule.exact_end(ids, len(ids))

    def _stash(self, state: SequenceState, live: Sequence[int]):
        ids = tuple(live)
        if not ids or not self.capacity:
            return
        marks = getattr(state, "marks", None)
        points = (len(ids),) if marks is None else tuple(m for m in marks if m < len(ids)) + (len(ids),)
        if any(e.ids[: len(ids)] == ids and all(reach(e.snapshot, m) == m for m in points)
               for e in self.entries.values()):
            return  # a cached sequence holds it already
        snap = state.snapshot(len(ids))
        if snap.nbytes > self.capacity:
            return
        for key in [k for k, e in self.entries.items() if ids[: len(e.ids)] == e.ids and covers(snap, e.snapshot)]:
            self._drop(key)  # a prefix of what is stored now
        self._add(CachedPrompt(ids, snap))
        self.stats.stored += 1
        self._fit()

    def snapshot_stats(self) -> dict:
        s = self.stats
        return {"lookups": s.lookups, "hits": s.hits, "reused_tokens": s.reused_tokens,
                "computed_tokens": s.computed_tokens, "settled_tokens": s.settled_tokens, "stored": s.stored, "evictions": s.evictions,
                "entries": len(self.entries), "bytes": self.nbytes, "capacity_bytes": self.capacity}


class LayerStatesSnapshot:
    """parts: each positional layer's snapshot after `length` tokens (None at recurrent layers); marks: for each
    length it can be restored at (length itself and earlier marks), the recurrent layers' copies (None at
    positional layers). No marks: positional layers only, restorable at any length up to `length`."""

    def __init__(self, parts: list, length: int, marks: dict[int, list] | None = None):
        self.parts, self.length = parts, length
        self.marks = dict(marks or {})

    @property
    def restorable(self) -> tuple[int, ...]:
        return tuple(sorted(self.marks)) if self.marks else (self.length,)

    def reach(self, length: int) -> int:
        if not self.marks:
            return min(length, self.length)
        return max((m for m in self.marks if m <= length), default=0)

    def copies(self) -> list:
        return [c for cs in self.marks.values() for c in cs if c is not None]

    @property
    def positional_nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts if p is not None)

    @property
    def nbytes(self) -> int:
        return self.positional_nbytes + sum(c.nbytes for c in self.copies())


class LayerStates:
    """A sequence's state as one object per layer. Positional layers (a KV cache) take snapshot(length) at any time
    after; recurrent ones (snapshot() / restore() with no length: GatedDeltaState, a sliding layer's WindowState of
    its last window - 1 keys and values) are copied when mark(length) says the state is the one after `length`
    tokens, and only those lengths (and the current one) can be snapshot or gone back to. mark(length, keep) keeps
    the earlier copies whose lengths are in keep (none by default: only the newest)."""

    def __init__(self, layers: list):
        self.layers = layers
        self.length = 0
        self._initial = [None if self._positional(s) else s.snapshot() for s in layers]  # before the first token
        self._marked: dict[int, list] = {}  # length -> copies of the recurrent layers' states (None: positional)

    @staticmethod
    def _positional(layer) -> bool:
        return hasattr(layer, "max_tokens")

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def _recurrent(self) -> bool:
        return any(i is not None for i in self._initial)

    @property
    def marks(self) -> tuple[int, ...] | None:
        """The lengths copies are kept at, ascending (None for positional layers only: any length is kept)."""
        return tuple(sorted(self._marked)) if self._recurrent else None

    def copies(self, newest: bool = False) -> list:
        """The marked copies held (newest: only those of the newest mark)."""
        if not self._marked:
            return []
        held = [self._marked[max(self._marked)]] if newest else self._marked.values()
        return [c for cs in held for c in cs if c is not None]

    def forget(self, length: int):
        self._marked.pop(length, None)

    def mark(self, length: int, keep=frozenset()):
        if not self._recurrent:
            return
        self._marked = {m: c for m, c in self._marked.items() if m in keep and m < length}
        self._marked[length] = [None if self._positional(s) else s.snapshot() for s in self.layers]

    def reach(self, length: int) -> int:
        if not self._recurrent:
            return min(length, self.length)
        return max((m for m in self._marked if m <= length), default=0)

    def snapshot(self, length: int) -> LayerStatesSnapshot:
        """A copy of the state after `length` tokens (a length mark() kept, or the current length) with the
        earlier marks' copies (shared: a copy is never written)."""
        marks = {m: c for m, c in self._marked.items() if m <= length}
        if self._recurrent and length not in marks:
            if length != self.length:
                raise ValueError(f"no recurrent state was kept after {length} tokens (mark it during the prefill)")
            marks[length] = [None if self._positional(s) else s.snapshot() for s in self.layers]
        return LayerStatesSnapshot([s.snapshot(length) if self._positional(s) else None for s in self.layers],
                                   length, marks)

    def _recurrent_at(self, copies: list | None):
        for layer, part, initial in zip(self.layers, copies or self._initial, self._initial):
            if not self._positional(layer):
                layer.restore(part if copies else initial)

    def restore(self, snap: LayerStatesSnapshot, length: int) -> int:
        n = snap.reach(length) if self._recurrent else min(length, snap.length)
        self._recurrent_at(snap.marks.get(n) if n else None)
        for layer, part in zip(self.layers, snap.parts):
            if self._positional(layer):
                layer.restore(part, n)
        self.length = n
        self._marked = {m: c for m, c in snap.marks.items() if m <= n} if self._recurrent else {}
        return n

    def rewind(self, length: int) -> int:
        n = self.reach(length) if self._recurrent else length
        if self._recurrent:
            self._recurrent_at(self._marked.get(n) if n else None)
            self._marked = {m: c for m, c in self._marked.items() if m <= n}
        for layer in self.layers:
            if self._positional(layer):
                layer.rewind(n)
        self.length = n
        return n
