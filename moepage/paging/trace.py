"""Routing traces: the expert cache's access sequence written to a file, and offline replays of it.

A trace is JSON lines, one per expert access in the order the engine asked for it: `{"l": layer, "e": expert}`.
Replaying a trace through an eviction policy at a given capacity (in experts) takes seconds
and gives the hit rate that policy would have had on the same requests, without reading any weights.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from moepage.paging.policy import make_policy

Key = tuple[int, int]


class TraceRecorder:
    """Attach to an ExpertCache (cache.on_access) to append every access to `path`."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "w", buffering=1 << 16)
        self._lock = threading.Lock()
        self.accesses = 0

    def __call__(self, key: Key, hit: bool):
        with self._lock:
            self._f.write(f'{{"l": {key[0]}, "e": {key[1]}}}\n')
            self.accesses += 1

    def close(self):
        with self._lock:
            self._f.close()


def load_trace(path: str) -> list[Key]:
    keys = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{i}: not a JSON line") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("l"), int) or not isinstance(rec.get("e"), int):
                raise ValueError(f"{path}:{i}: expected {{\"l\": layer, \"e\": expert}}, got {line.strip()!r}")
            keys.append((rec["l"], rec["e"]))
    return keys


@dataclass
class ReplayResult:
    policy: str
    capacity: int
    accesses: int
    hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


def replay(keys: list[Key], policy: str, capacity: int) -> ReplayResult:
    """Hit count of `policy` with room for `capacity` experts on the access sequence `keys` (no prefetch)."""
    if capacity < 1:
        raise ValueError("capacity must be at least one expert")
    p = make_policy(policy)
    resident: set[Key] = set()
    hits = 0
    for key in keys:
        if key in resident:
            hits += 1
            p.touch(key)
            continue
        if len(resident) >= capacity:
            victim = next(iter(p.victims()))
            resident.discard(victim)
            p.remove(victim)
        resident.add(key)
        p.insert(key)
    return ReplayResult(policy, capacity, len(keys), hits)
