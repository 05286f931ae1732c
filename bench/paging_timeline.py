"""Where a paged decode step's time goes: tok/s, how much of the time some expert read is in flight, reads per
token and their mean time, and the time the decode thread waits for reads; the same for the prompt (time to first
token); optionally one token's layer-by-layer read timeline. Runs in this process under moepage's own
--memory-budget (no cgroup: for A/B runs of paging changes).

    python bench/paging_timeline.py MODEL --memory-budget BYTES [--prompt-tokens 512] [--io-threads 2] [--pregate]
        [--show-token]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moepage.engine.engine import Engine, EngineConfig  # noqa: E402
from moepage.engine.sampling import SamplingParams  # noqa: E402


def busy_seconds(intervals: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Length of the union of intervals clipped to [t0, t1]."""
    total, cur = 0.0, None
    for a, b in sorted((max(a, t0), min(b, t1)) for a, b in intervals if b > t0 and a < t1):
        if cur is None or a > cur[1]:
            total += cur[1] - cur[0] if cur else 0.0
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (cur[1] - cur[0] if cur else 0.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--memory-budget", type=int, required=True)
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--pregate", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=25, help="decode steps (the first 5 are warm-up)")
    ap.add_argument("--show-token", action="store_true", help="print the reads of one decode step")
    a = ap.parse_args()
    engine = Engine.load(EngineConfig(a.model, memory_budget=a.memory_budget, io_threads=a.io_threads, threads=2,
                                      verify_shards=False, tokenizer=False, ctx_size=a.prompt_tokens + a.tokens + 8,
                                      pregate=a.pregate))
    print(engine.plan.summary())
    cache, reads, lock = engine.cache, [], threading.Lock()
    load, acquire = cache.load, cache.acquire
    waited = [0.0]

    def timed_load(layer, e, *buffer):
        t0 = time.perf_counter()
        value = load(layer, e, *buffer)
        with lock:
            reads.append((t0, time.perf_counter(), layer, e))
        return value

    def timed_acquire(key):
        t0 = time.perf_counter()
        value = acquire(key)
        waited[0] += time.perf_counter() - t0
        return value

    # acquire_many (decode) and use (prompt) call acquire for every expert not yet resident: timed once here
    cache.load, cache.acquire = timed_load, timed_acquire
    ids = [(i * 7919) % (engine.args.vocab_size - 8) for i in range(a.prompt_tokens)]
    stamps, wait_at = [], []
    start = time.perf_counter()
    for s in engine.generate(ids, SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)):
        stamps.append(time.perf_counter())
        wait_at.append(waited[0])
    first = [(r[0], r[1]) for r in reads if r[0] <= stamps[0]]
    print(f"prompt of {len(ids)} tokens: first token after {stamps[0] - start:.2f} s, waiting for reads "
          f"{wait_at[0]:.2f} s, some read in flight {busy_seconds(first, start, stamps[0]) / (stamps[0] - start):.0%} "
          f"of the time; {len(first)} reads, {sum(b - a for a, b in first) / max(1, len(first)) * 1e3:.2f} ms each")
    t0, t1, n = stamps[4], stamps[-1], len(stamps) - 5
    spans = [(r[0], r[1]) for r in reads if t0 <= r[0] <= t1]
    print(f"{n / (t1 - t0):.2f} tok/s, {(t1 - t0) / n * 1e3:.0f} ms a token: waiting for reads "
          f"{(wait_at[-1] - wait_at[4]) / n * 1e3:.0f} ms, some read in flight {busy_seconds(spans, t0, t1) / (t1 - t0):.0%}"
          f" of the time; {len(spans) / n:.1f} reads a token, {sum(b - a for a, b in spans) / max(1, len(spans)) * 1e3:.2f}"
          f" ms each; {cache.stats.snapshot()}")
    if a.show_token:
        for r in sorted(r for r in reads if stamps[5] <= r[0] <= stamps[6]):
            print(f"  L{r[2]:<3} E{r[3]:<4} {(r[0] - stamps[5]) * 1e3:8.2f} -> {(r[1] - stamps[5]) * 1e3:8.2f} ms")
    engine.close()


if __name__ == "__main__":
    main()
