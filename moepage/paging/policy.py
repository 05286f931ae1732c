"""Eviction policies for the expert cache: which resident expert goes first."""
from __future__ import annotations

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
        """Keys in eviction order (first = evict first)."""
        return iter(list(self._order))


class LFUPolicy:
    """Least frequently used with ageing: counts halve every `half_life` accesses."""

    name = "lfu"

    def __init__(self, half_life: int = 4096):
        self.counts: dict[Hashable, float] = {}
        self.last: dict[Hashable, int] = {}
        self.clock = 0
        self.half_life = half_life

    def _bump(self, key):
        self.clock += 1
        if self.clock % self.half_life == 0:
            for k in self.counts:
                self.counts[k] *= 0.5
        self.counts[key] = self.counts.get(key, 0.0) + 1.0
        self.last[key] = self.clock

    def insert(self, key):
        self._bump(key)

    def touch(self, key):
        if key in self.counts:
            self._bump(key)

    def remove(self, key):
        self.counts.pop(key, None)
        self.last.pop(key, None)

    def victims(self):
        return iter(sorted(self.counts, key=lambda k: (self.counts[k], self.last[k])))


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str):
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose from {', '.join(POLICIES)}") from None
