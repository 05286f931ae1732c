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
through LayerStates) offers nbytes, mark(length), snapshot(length), restore(snapshot, length) and rewind(length);
the last two return the length they could go back to (a recurrent state only to a marked one, or 0).
"""
from __future__ import annotations

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


class PromptCache:
    """Snapshots of earlier sequences in LRU order, within capacity_bytes, plus the live sequence the engine holds
    (its state object: re-used in place, stashed here only when another prompt is about to overwrite it).
    Used by the engine's thread only; snapshot_stats reads counters (no lock: /metrics never waits on a copy)."""

    def __init__(self, capacity_bytes: int, chunks: ChunkSchedule | int):
        if capacity_bytes < 0:
            raise ValueError(f"prompt cache bytes must be >= 0, got {capacity_bytes}")
        self.capacity = int(capacity_bytes)
        self.schedule = chunks if isinstance(chunks, ChunkSchedule) else ChunkSchedule(int(chunks))
        self.entries: OrderedDict[int, CachedPrompt] = OrderedDict()  # key: id(entry); oldest first
        self.stats = PromptCacheStats()
        self.nbytes = 0  # of the snapshots held

    def _add(self, entry: CachedPrompt):
        self.entries[id(entry)] = entry
        self.nbytes += entry.snapshot.nbytes

    def _drop(self, key: int) -> CachedPrompt:
        entry = self.entries.pop(key)
        self.nbytes -= entry.snapshot.nbytes
        return entry

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
        start = self.reusable(live, ids)
        best = max(self.entries.values(), key=lambda e: self.reusable(e.ids, ids), default=None)
        if best is not None and self.reusable(best.ids, ids) > start:
            self._stash(state, live)
            self._drop(id(best))  # it becomes the live state
            start = state.restore(best.snapshot, self.reusable(best.ids, ids))
        else:
            if not self._kept(live, ids):  # the prefill overwrites what only the live state holds
                self._stash(state, live)
            start = state.rewind(start)
        self.stats.hits += start > 0
        self.stats.reused_tokens += start
        self.stats.computed_tokens += len(ids) - start
        return start

    def _kept(self, live: Sequence[int], ids: Sequence[int]) -> bool:
        """Whether the live state is still exact for `live` after ids is prefilled into it."""
        return tuple(ids[: len(live)]) == tuple(live) and len(live) <= self.schedule.exact_end(ids, len(ids))

    def _stash(self, state: SequenceState, live: Sequence[int]):
        ids = tuple(live)
        if not ids or not self.capacity or any(e.ids[: len(ids)] == ids for e in self.entries.values()):
            return  # nothing exact, or a cached sequence holds it already
        snap = state.snapshot(len(ids))
        if snap.nbytes > self.capacity:
            return
        for key in [k for k, e in self.entries.items() if ids[: len(e.ids)] == e.ids]:
            self._drop(key)  # a prefix of what is stored now
        while self.entries and self.nbytes + snap.nbytes > self.capacity:
            self._drop(next(iter(self.entries)))
            self.stats.evictions += 1
        self._add(CachedPrompt(ids, snap))
        self.stats.stored += 1

    def snapshot_stats(self) -> dict:
        s = self.stats
        return {"lookups": s.lookups, "hits": s.hits, "reused_tokens": s.reused_tokens,
                "computed_tokens": s.computed_tokens, "settled_tokens": s.settled_tokens, "stored": s.stored, "evictions": s.evictions,
                "entries": len(self.entries), "bytes": self.nbytes, "capacity_bytes": self.capacity}


class LayerStatesSnapshot:
    def __init__(self, parts: list, length: int):
        self.parts, self.length = parts, length

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


class LayerStates:
    """A sequence's state as one object per layer. Positional layers (a KV cache) take snapshot(length) at any time
    after; recurrent ones (snapshot() / restore() with no length, e.g. GatedDeltaState) are copied when mark(length)
    says the state is the one after `length` tokens, and only those lengths can be snapshot."""

    def __init__(self, layers: list):
        self.layers = layers
        self.length = 0
        self._initial = [None if self._positional(s) else s.snapshot() for s in layers]  # before the first token
        self._marked: dict[int, list] = {}  # length -> copies of the recurrent layers' states

    @staticmethod
    def _positional(layer) -> bool:
        return hasattr(layer, "max_tokens")

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def _recurrent(self) -> bool:
        return any(i is not None for i in self._initial)

    def mark(self, length: int):
        self._marked = {length: [None if self._positional(s) else s.snapshot() for s in self.layers]}

    def snapshot(self, length: int) -> LayerStatesSnapshot:
        recurrent = self._marked.get(length)
        if recurrent is None and any(not self._positional(s) for s in self.layers):
            raise ValueError(f"no recurrent state was kept after {length} tokens (mark it during the prefill)")
        return LayerStatesSnapshot([s.snapshot(length) if self._positional(s) else recurrent[i]
                                    for i, s in enumerate(self.layers)], length)

    def _recurrent_at(self, parts: list, length: int) -> int:
        for layer, part, initial in zip(self.layers, parts, self._initial):
            if not self._positional(layer):
                layer.restore(part if length else initial)
        return length

    def restore(self, snap: LayerStatesSnapshot, length: int) -> int:
        n = (snap.length if length >= snap.length else 0) if self._recurrent else min(length, snap.length)
        self._recurrent_at(snap.parts, n)
        for layer, part in zip(self.layers, snap.parts):
            if self._positional(layer):
                layer.restore(part, n)
        self.length, self._marked = n, {n: [p if i is not None else None for p, i in zip(snap.parts, self._initial)]}
        return n

    def rewind(self, length: int) -> int:
        marked = max((m for m in self._marked if m <= length), default=0)
        n = marked if self._recurrent else length
        self._recurrent_at(self._marked.get(n, self._initial), n)
        for layer in self.layers:
            if self._positional(layer):
                layer.rewind(n)
        self.length = n
        return n
