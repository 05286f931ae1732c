"""ExpertCache: prepared experts held under a byte budget, paged in on demand or ahead of time.

Bytes are reserved before a read starts, so resident + in-flight bytes never exceed the budget.
An expert in use (pinned) is never evicted; everything else leaves in the policy's order.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from moepage.paging.policy import make_policy
from moepage.paging.stats import CacheStats

Key = tuple[int, int]  # (layer, expert)


class BudgetTooSmall(RuntimeError):
    pass


class PrefetchCancelled(Exception):
    """A queued prefetch withdrawn before its read started (whoever waited on it reads the expert itself)."""


@dataclass
class _Entry:
    value: Any
    nbytes: int
    pins: int = 0
    from_prefetch: bool = False


class ExpertCache:
    def __init__(
        self,
        load: Callable[[int, int], Any],
        nbytes_of: Callable[[int], int],
        budget_bytes: int,
        policy: str = "lru",
        workers: int = 2,
    ):
        self.load = load
        self.nbytes_of = nbytes_of
        self.budget = int(budget_bytes)
        self.policy = make_policy(policy)
        self.stats = CacheStats()
        self._cond = threading.Condition()
        self._entries: dict[Key, _Entry] = {}
        self._loading: dict[Key, Future] = {}
        self._queued: dict[Key, tuple[Future, int]] = {}  # withdrawable prefetches not yet started: (task, bytes)
        self._spares: list = []  # slot buffers of evicted experts, reused by the next reads (no fresh pages)
        self._used = 0
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="moepage-pagein")
        self.on_access: list[Callable[[Key, bool], None]] = []  # (key, hit) observers, e.g. a trace recorder

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def resident_keys(self) -> set[Key]:
        with self._cond:
            return set(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def _evict(self, key: Key):
        """Drop key; its slot buffer (if the value has one of the reserved size) is kept for the next read, its
        bytes still counted in _used until that read takes it or _reserve drops it."""
        e = self._entries.pop(key)
        self.policy.remove(key)
        buf = getattr(e.value, "buffer", None)
        if buf is not None and buf.numel() == e.nbytes:
            self._spares.append(buf)
        else:
            self._used -= e.nbytes
        with self.stats.lock:
            self.stats.evictions += 1
            if e.from_prefetch:
                self.stats.prefetch_wasted += 1

    def _reserve(self, n: int) -> tuple[bool, Any]:
        """Make room for n bytes: (False, None) when pinned experts leave none; else (True, a spare slot buffer of
        n bytes to read into, or None)."""
        if n > self.budget:
            return False, None
        while True:
            spare = next((i for i, b in enumerate(self._spares) if b.numel() == n), None)
            if spare is not None:
                return True, self._spares.pop(spare)
            if self._used + n <= self.budget:
                self._used += n
                return True, None
            if self._spares:  # a slot of another size: give its memory back
                self._used -= self._spares.pop().numel()
                continue
            victim = next((k for k in self.policy.victims() if self._entries[k].pins == 0), None)
            if victim is None:
                return False, None
            self._evict(victim)

    def _drop_spares(self):
        self._used -= sum(b.numel() for b in self._spares)
        self._spares.clear()

    def resize(self, budget_bytes: int):
        with self._cond:
            self.budget = int(budget_bytes)
            self._drop_spares()
            for k in list(self.policy.victims()):
                if self._used <= self.budget:
                    break
                if self._entries[k].pins == 0:
                    self._evict(k)
                    self._drop_spares()  # an evicted slot is memory to give back here, not to reuse

    # ---- reads --------------------------------------------------------------------------------
    def _read(self, key: Key, buffer=None):
        t0 = time.perf_counter()
        value = self.load(*key) if buffer is None else self.load(*key, buffer)
        dt = time.perf_counter() - t0
        with self.stats.lock:
            self.stats.page_in.observe(dt)
            self.stats.bytes_read += getattr(value, "stored_nbytes", 0)
        return value

    def acquire(self, key: Key):
        """The prepared expert for key, pinned until release(key)."""
        counted = False
        while True:
            with self._cond:
                e = self._entries.get(key)
                if e is not None:
                    e.pins += 1
                    self.policy.touch(key)
                    with self.stats.lock:
                        if not counted:
                            self.stats.hits += 1
                        if e.from_prefetch:
                            self.stats.prefetch_used += 1
                    e.from_prefetch = False
                    for cb in self.on_access:
                        cb(key, not counted)
                    return e.value
                if not counted:
                    counted = True
                    with self.stats.lock:
                        self.stats.misses += 1
                fut = self._loading.get(key)
                if fut is None:
                    n = self.nbytes_of(key[0])
                    ok, buffer = self._reserve(n)
                    if not ok:
                        if self._loading:
                            self._cond.wait(0.05)
                            continue
                        raise BudgetTooSmall(
                            f"expert cache budget {self.budget} bytes cannot hold layer {key[0]} expert {key[1]} "
                            f"({n} bytes) next to {sum(x.pins > 0 for x in self._entries.values())} experts in use"
                        )
                    fut = Future()
                    self._loading[key] = fut
                    mine = True
                else:
                    mine = False
            if not mine:
                try:
                    fut.result()
                except Exception:
                    pass  # a failed prefetch: the next pass reads inline and raises the real error
                continue
            value = self._load_into(key, n, fut, pinned=True, buffer=buffer)
            with self._cond:
                for cb in self.on_access:
                    cb(key, False)
            return value

    def release(self, key: Key):
        with self._cond:
            e = self._entries.get(key)
            if e is not None:
                e.pins -= 1
            self._cond.notify_all()

    def acquire_many(self, keys: list[Key]) -> list:
        """acquire() each key in order (their reads were prefetched together); all pinned until release_many."""
        with self._cond:  # the common decode case, every expert resident: one lock round
            entries = [self._entries.get(k) for k in keys]
            if all(e is not None for e in entries):
                with self.stats.lock:
                    self.stats.hits += len(keys)
                    self.stats.prefetch_used += sum(e.from_prefetch for e in entries)
                for k, e in zip(keys, entries):
                    e.pins += 1
                    e.from_prefetch = False
                    self.policy.touch(k)
                    for cb in self.on_access:
                        cb(k, True)
                return [e.value for e in entries]
        got = []
        try:
            for key in keys:
                got.append(self.acquire(key))
        except BaseException:
            self.release_many(keys[: len(got)])
            raise
        return got

    def release_many(self, keys: list[Key]):
        with self._cond:
            for key in keys:
                e = self._entries.get(key)
                if e is not None:
                    e.pins -= 1
            self._cond.notify_all()

    @contextmanager
    def use(self, key: Key):
        value = self.acquire(key)
        try:
            yield value
        finally:
            self.release(key)

    def touch(self, keys):
        """Count resident keys as just used, so the policy evicts them last (a layer-major prefill keeps the layer it
        is on while it reads the next one's experts)."""
        with self._cond:
            for key in keys:
                if key in self._entries:
                    self.policy.touch(key)

    def prefetch(self, keys, withdrawable: bool = False) -> int:
        """Start background reads of keys not yet resident; returns how many were issued. withdrawable: guesses
        that cancel_prefetches may take back while they wait in the queue (pre-gating)."""
        issued = 0
        for key in keys:
            with self._cond:
                if key in self._entries or key in self._loading:
                    continue
                n = self.nbytes_of(key[0])
                ok, buffer = self._reserve(n)
                if not ok:
                    with self.stats.lock:
                        self.stats.prefetch_dropped += 1
                    continue
                fut = Future()
                self._loading[key] = fut
                with self.stats.lock:
                    self.stats.prefetch_issued += 1
                task = self._pool.submit(self._prefetch_one, key, n, fut, buffer)
                if withdrawable:
                    self._queued[key] = (task, n)
            issued += 1
        return issued

    def cancel_prefetches(self, layer: int, keep) -> int:
        """Withdraw the withdrawable (pre-gating) prefetches of `layer` still queued for experts outside `keep`, the
        guesses the real routing did not pick: their bytes go back to the budget and the disk reads what is needed
        next. Other prefetches (a layer's own misses, the secretary's) are never withdrawn."""
        if not self._queued:  # no guess waiting (pre-gating off): no lock on the decode path
            return 0
        cancelled = 0
        with self._cond:
            for key in [k for k in self._queued if k[0] == layer and k[1] not in keep]:
                task, n = self._queued.pop(key)
                if task.cancel():
                    self._used -= n
                    self._loading.pop(key).set_exception(PrefetchCancelled(key))
                    cancelled += 1
            if cancelled:
                with self.stats.lock:
                    self.stats.prefetch_cancelled += cancelled
                self._cond.notify_all()
        return cancelled

    def _prefetch_one(self, key: Key, n: int, fut: Future, buffer=None):
        with self._cond:
            self._queued.pop(key, None)
        try:
            self._load_into(key, n, fut, pinned=False, buffer=buffer)
        except BaseException:
            pass  # recorded on the future; acquire() reads again inline and raises the real error

    def _load_into(self, key: Key, n: int, fut: Future, pinned: bool, buffer=None):
        """Read key into its reserved n bytes (into buffer, a recycled slot, when given); on failure give the bytes
        back and re-raise."""
        try:
            value = self._read(key, buffer)
        except BaseException as exc:
            with self._cond:
                self._used -= n
                self._loading.pop(key, None)
                fut.set_exception(exc)
                self._cond.notify_all()
            raise
        with self._cond:
            self._entries[key] = _Entry(value, n, pins=1 if pinned else 0, from_prefetch=not pinned)
            self.policy.insert(key)
            self._loading.pop(key, None)
            fut.set_result(True)
            self._cond.notify_all()
        return value

    def wait_idle(self):
        """Block until no read is in flight (tests, shutdown)."""
        with self._cond:
            while self._loading:
                self._cond.wait(0.05)

    def clear(self):
        self.wait_idle()
        with self._cond:
            for k in [k for k, e in self._entries.items() if e.pins == 0]:
                self._entries.pop(k)
                self.policy.remove(k)
            self._spares.clear()
            self._used = sum(e.nbytes for e in self._entries.values())

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)
