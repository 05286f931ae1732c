"""Counters of the expert cache, read by the CLI summary, the bench and the Prometheus collector."""
from __future__ import annotations

import bisect
import threading
from collections import deque
from dataclasses import dataclass, field

# Page-in latency histogram bucket upper bounds, seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class LatencyHistogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=20000))

    def observe(self, seconds: float):
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.n += 1
        self.recent.append(seconds)

    def quantile(self, q: float) -> float:
        if not self.recent:
            return 0.0
        data = sorted(self.recent)
        return data[min(len(data) - 1, int(q * len(data)))]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    prefetch_dropped: int = 0
    prefetch_cancelled: int = 0  # queued guesses withdrawn once the real routing was known
    guess_predicted: int = 0  # pre-gating: experts predicted for the next layer
    guess_correct: int = 0  # ... that the next layer then used
    guess_needed: int = 0  # experts the predicted layers used
    page_in: LatencyHistogram = field(default_factory=LatencyHistogram)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def count_guess(self, predicted: set, actual: set):
        with self.lock:
            self.guess_predicted += len(predicted)
            self.guess_needed += len(actual)
            self.guess_correct += len(predicted & actual)

    @property
    def guess_precision(self) -> float:
        return self.guess_correct / self.guess_predicted if self.guess_predicted else 0.0

    @property
    def guess_recall(self) -> float:
        return self.guess_correct / self.guess_needed if self.guess_needed else 0.0

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "bytes_read": self.bytes_read, "hit_rate": self.hit_rate,
                "prefetch_issued": self.prefetch_issued, "prefetch_used": self.prefetch_used,
                "prefetch_wasted": self.prefetch_wasted, "prefetch_dropped": self.prefetch_dropped,
                "prefetch_cancelled": self.prefetch_cancelled,
                "guess_predicted": self.guess_predicted, "guess_correct": self.guess_correct,
                "guess_needed": self.guess_needed, "guess_precision": self.guess_precision,
                "guess_recall": self.guess_recall,
                "page_in_count": self.page_in.n, "page_in_seconds_total": self.page_in.total,
                "page_in_p50_s": self.page_in.quantile(0.5), "page_in_p99_s": self.page_in.quantile(0.99),
            }
