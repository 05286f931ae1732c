"""The disk tier: experts fetched from the Hub, kept as files under a byte budget, least recently used out first.

Tiers, nearest first: the memory cache (paging/cache.py) -> this directory -> the Hub (paging/hub_source.py).
Every file lands whole or not at all: written to a hidden temporary name in its own folder, fsynced, renamed,
and the folder fsynced; a temporary left by a process killed mid-write is deleted the next time the tier opens,
so it is never read. What a file must hash to is kept by the caller (a manifest, or HashLog below): a file the
tier holds is verified again the first time each process opens it (paging/sources.py ShardFiles).
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

from moepage.paging.pread import ExpertReadError
from moepage.paging.stats import LatencyHistogram

TMP_SUFFIX = ".tmp"
EXPERTS_DIR = "experts"
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds per Hub fetch


@dataclass
class TierStats:
    """Counters of the disk tier and the Hub behind it (the memory tier counts itself: paging/stats.py)."""

    disk_hits: int = 0  # page-ins served by a file already in the tier
    disk_bytes: int = 0  # bytes of those files
    hub_fetches: int = 0  # experts fetched from the Hub (each then written to the tier)
    hub_bytes: int = 0  # bytes received from the Hub for them
    hub_errors: int = 0  # fetches that failed (no network, HTTP error, a hash mismatch)
    evictions: int = 0  # files the tier deleted to stay within its budget
    fetch_seconds: LatencyHistogram = field(default_factory=lambda: LatencyHistogram(
        buckets=FETCH_BUCKETS, counts=[0] * (len(FETCH_BUCKETS) + 1)))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict:
        with self.lock:
            h = self.fetch_seconds
            return {"disk_hits": self.disk_hits, "disk_bytes": self.disk_bytes, "hub_fetches": self.hub_fetches,
                    "hub_bytes": self.hub_bytes, "hub_errors": self.hub_errors, "evictions": self.evictions,
                    "fetch_buckets": list(h.buckets), "fetch_counts": list(h.counts), "fetch_seconds_total": h.total,
                    "fetch_p50_s": h.quantile(0.5), "fetch_p99_s": h.quantile(0.99)}


def write_atomic(path: str, data) -> None:
    """path holds data whole, or is untouched: a hidden temporary in the same folder, fsync, rename, fsync folder."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(folder)


def fsync_dir(folder: str):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


class DiskTier:
    """Expert files under root/experts/, at most `budget` bytes of them (None: no limit), LRU-evicted.

    A file being read (pinned) is never evicted. Recency survives restarts through the files' mtimes."""

    def __init__(self, root: str, budget: int | None = None, stats: TierStats | None = None):
        self.root = root
        self.budget = budget
        self.stats = stats or TierStats()
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # rel -> bytes, least recently used first
        self._pins: dict[str, int] = {}
        self.forget_hooks: list = []  # called with rel when a file leaves the tier
        self._scan()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._files.values())

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, rel: str) -> bool:
        return rel in self._files

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._files)

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _scan(self):
        """The files already here, oldest mtime first; temporaries of an interrupted write are deleted."""
        found = []
        base = os.path.join(self.root, EXPERTS_DIR)
        for dirpath, dirs, names in os.walk(base):
            dirs.sort()
            for n in names:
                p = os.path.join(dirpath, n)
                if n.endswith(TMP_SUFFIX):
                    os.unlink(p)  # half-written by a process that was killed: never read
                    continue
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                found.append((st.st_mtime_ns, os.path.relpath(p, self.root).replace(os.sep, "/"), st.st_size))
        for _, rel, size in sorted(found):
            self._files[rel] = size

    def resize(self, budget: int | None):
        """A new budget; files beyond it leave now, least recently used first."""
        with self._lock:
            self.budget = budget
            self._evict_locked(0)

    def lookup(self, rel: str) -> str | None:
        """The path of rel if the tier holds it (counted as a disk hit, made most recent), else None."""
        with self._lock:
            size = self._files.get(rel)
            if size is None:
                return None
            self._files.move_to_end(rel)
        try:
            os.utime(self.path(rel))  # recency for the next start
        except FileNotFoundError:
            self.drop(rel)
            return None
        except OSError:
            pass
        with self.stats.lock:
            self.stats.disk_hits += 1
            self.stats.disk_bytes += size
        return self.path(rel)

    def store(self, rel: str, data) -> str:
        """Write data as rel (atomically), evicting least recently used files to stay within the budget."""
        n = len(data)
        with self._lock:
            old = self._files.pop(rel, None)
            if not self._evict_locked(n, keep=rel):
                if old is not None:
                    self._files[rel] = old
                held = sum(self._files.values())
                raise ExpertReadError(f"{self.path(rel)}: the disk tier's budget ({self.budget} bytes) cannot take "
                                      f"{n} more bytes ({held} held by experts being read); raise --disk-budget")
            self._files[rel] = n  # reserved before the write, so concurrent stores never overshoot the budget
        try:
            write_atomic(self.path(rel), data)
        except OSError as e:
            with self._lock:
                self._files.pop(rel, None)
            raise ExpertReadError(f"{self.path(rel)}: cannot write to the disk tier: {e.strerror}") from None
        return self.path(rel)

    def _evict_locked(self, extra: int, keep: str | None = None) -> bool:
        """Delete unpinned files, least recently used first, until extra more bytes fit; False if they cannot."""
        if self.budget is None:
            return True
        used = sum(self._files.values())
        for rel in list(self._files):
            if used + extra <= self.budget:
                break
            if self._pins.get(rel) or rel == keep:
                continue
            used -= self._files.pop(rel)
            self._unlink(rel)
            with self.stats.lock:
                self.stats.evictions += 1
        return used + extra <= self.budget

    def _unlink(self, rel: str):
        try:
            os.unlink(self.path(rel))
        except FileNotFoundError:
            pass
        for hook in self.forget_hooks:
            hook(rel)

    def drop(self, rel: str):
        """Remove rel (a file that failed its check, or vanished)."""
        with self._lock:
            self._files.pop(rel, None)
            self._unlink(rel)

    @contextmanager
    def pinned(self, rel: str):
        """rel stays in the tier while the block runs (a page-in between its fetch and its read)."""
        with self._lock:
            self._pins[rel] = self._pins.get(rel, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._pins[rel] -= 1
                if not self._pins[rel]:
                    del self._pins[rel]


_LINE = re.compile(r"^(?P<rel>[\w./-]{1,200}) (?P<sha>[0-9a-f]{64}) (?P<size>\d{1,15}) (?P<etag>[\w.:+/=-]{1,200})$")


class HashLog:
    """sha256 of each expert file the first time it was fetched, against the ETag of the Hub file its bytes came
    from: an append-only text file, one fsynced line per expert ("rel sha256 size etag"). A torn last line (a
    process killed mid-append) and lines recorded against another ETag are ignored."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def load(self, etags: dict[str, str]) -> dict[str, tuple[str, int]]:
        """{rel: (sha256, size)} for lines whose etag is etags[rel] (the ETag each expert's bytes must come from)."""
        out: dict[str, tuple[str, int]] = {}
        try:
            with open(self.path, "rb") as f:
                raw = f.read(64 << 20)
        except FileNotFoundError:
            return out
        for line in raw.decode("utf-8", "replace").split("\n")[:-1]:  # the text after the last newline is torn
            m = _LINE.match(line)
            if m and etags.get(m["rel"]) == m["etag"]:
                out[m["rel"]] = (m["sha"], int(m["size"]))
        return out

    def append(self, rel: str, sha: str, size: int, etag: str):
        line = f"{rel} {sha} {size} {etag}\n"
        if not _LINE.match(line[:-1]):
            raise ExpertReadError(f"{self.path}: cannot record {rel!r} with ETag {etag!r}")
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                end = os.fstat(fd).st_size
                if end and os.pread(fd, 1, end - 1) != b"\n":
                    line = "\n" + line  # after a torn line: start a line of our own
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
