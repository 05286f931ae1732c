"""Eviction policies for the expert cache: which resident expert goes first.

Keys are (layer, expert). A decode step visits the layers in order, so the experts used most recently are the
ones needed furthest in the future: with a cache smaller than one token's experts LRU evicts exactly what the
next layers need. "stale" evicts by layer distance (the layer that ran just before the current one goes first,
then the one before it; the current layer's own experts last), least frequently used first within a layer.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Hashable, Iterator


class LRUPolicy:
    name = "lru"

    def __init__(self):
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key):
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key):
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key):
        self._order.pop(key, None)

    def victims(self) -> Iterator[Hashable]:
        """Keys in eviction order (first = evict first), read lazily: the cache takes the first unpinned one of
        thousands (6,144 experts on a Qwen3-30B-A3B), so no copy of the order per eviction. Mutating the policy
        ends the iteration (take the keys you need first, as `list(victims())`)."""
        return iter(self._order)


class LFUPolicy:
    """Least frequently used with ageing: counts halve every `half_life` accesses.

    The counts are kept scaled by 2^(accesses // half_life): an access adds that power of two instead of halving
    every other count, so the ranks are those of the halved counts and ageing costs nothing per access (the scale
    is taken out of every score once every 512 half-lives). A heap of (score, last access, key) gives the victims
    in order: O(log n) an access, O(k log k) for the first k victims (entries a later access or a removal made
    stale are skipped, and the heap is rebuilt once they outnumber the live keys), instead of a sort of thousands
    of keys per eviction."""

    name = "lfu"
    RESCALE = 512  # half-lives between rescales (2^512 is far inside a float's range)

    def __init__(self, half_life: int = 4096):
        self.counts: dict[Hashable, float] = {}  # scaled: count x 2^(half-lives since _base)
        self.last: dict[Hashable, int] = {}
        self.clock = 0
        self.half_life = half_life
        self._base = 0  # the half-life the scores are scaled from
        self._heap: list[tuple[float, int, Hashable]] = []

    def _bump(self, key):
        self.clock += 1
        epoch = self.clock // self.half_life - self._base
        if epoch > self.RESCALE:
            factor = 2.0**-epoch
            self.counts = {k: v * factor for k, v in self.counts.items()}
            self._base += epoch
            epoch = 0
            self._rebuild()
        score = self.counts.get(key, 0.0) + 2.0**epoch
        self.counts[key] = score
        self.last[key] = self.clock
        heapq.heappush(self._heap, (score, self.clock, key))
        if len(self._heap) > 2 * len(self.counts) + 64:
            self._rebuild()

    def _rebuild(self):
        self._heap = [(self.counts[k], self.last[k], k) for k in self.counts]
        heapq.heapify(self._heap)

    def insert(self, key):
        self._bump(key)

    def touch(self, key):
        if key in self.counts:
            self._bump(key)

    def remove(self, key):
        self.counts.pop(key, None)
        self.last.pop(key, None)

    def victims(self) -> Iterator[Hashable]:
        """Keys least frequently used first (ties: least recently), read lazily from the heap; mutating the policy
        ends the iteration (take the keys you need first, as `list(victims())`)."""
        heap, last = self._heap, self.last
        while heap and last.get(heap[0][2]) != heap[0][1]:  # stale top entries go for good
            heapq.heappop(heap)

        def walk():
            frontier = [(heap[0], 0)] if heap else []
            while frontier:  # the heap's entries in order: a heap of the frontier of its tree
                (_, at, key), i = heapq.heappop(frontier)
                if last.get(key) == at:
                    yield key
                for j in (2 * i + 1, 2 * i + 2):
                    if j < len(heap):
                        heapq.heappush(frontier, (heap[j], j))

        return walk()


class StalePolicy:
    """Evict the experts whose layer runs again furthest in the future; within a layer, the least used."""

    name = "stale"

    def __init__(self, half_life: int = 4096):
        self.by_layer: dict[int, set] = {}
        self.lfu = LFUPolicy(half_life)
        self.current = 0  # layer of the latest access
        self.layers = 1  # layers seen so far (max layer + 1)

    def _seen(self, key):
        self.current = key[0]
        self.layers = max(self.layers, key[0] + 1)

    def insert(self, key):
        self._seen(key)
        self.by_layer.setdefault(key[0], set()).add(key)
        self.lfu.insert(key)

    def touch(self, key):
        self._seen(key)
        self.lfu.touch(key)

    def remove(self, key):
        bucket = self.by_layer.get(key[0])
        if bucket is not None:
            bucket.discard(key)
        self.lfu.remove(key)

    def victims(self):
        counts, last = self.lfu.counts, self.lfu.last
        # the layer before the current one ran longest ago in this step and runs again last; the current layer's
        # experts (being read or used right now) go only after every other layer's
        for back in list(range(1, self.layers)) + [0]:
            bucket = self.by_layer.get((self.current - back) % self.layers)
            if bucket:
                yield from sorted(bucket, key=lambda k: (counts[k], last[k]))


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy, "stale": StalePolicy}


def make_policy(name: str):
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose from {', '.join(POLICIES)}") from None
