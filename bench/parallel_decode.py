"""Batched decode (--parallel) inside the engine, without HTTP: N sequences decoded together by
engine/batch_step.py against each of them decoded alone, in alternating rounds, resident or under a memory budget.

    python bench/parallel_decode.py --model DIR [--memory-budget BYTES] [--policy auto|lru|stale] [--rounds 3]

Each round decodes --steps tokens of sequence 0 alone (model.forward, the server's single-sequence step), then
--steps batched steps of all --streams sequences; the sequences keep their KV caches across rounds (the prompts are
--prompt random token ids). Reports per round the alone tok/s, the aggregate tok/s together, their ratio, the
process CPU time per token of each phase (less at the mercy of a loaded machine than the wall clock) and the expert
cache's hit rate in each phase; medians and ranges at the end. bench/agent.py measures the same over HTTP.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--memory-budget", type=int, default=None)
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from moepage.engine.batch_step import decode_step
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.sampling import SamplingParams

    torch.set_num_threads(a.threads)
    ctx = a.prompt + 2 * a.rounds * a.steps + 8
    engine = Engine.load(EngineConfig(model=a.model, memory_budget=a.memory_budget, ctx_size=ctx, threads=a.threads,
                                      parallel=a.streams, policy=a.policy))
    print(engine.plan.summary(), f"policy {engine.cache.policy.name}", flush=True)
    rng = random.Random(0)
    vocab = min(engine.args.vocab_size, 150_000)
    greedy = SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True)
    stats = engine.cache.stats
    rows = []
    with engine.lock:
        seqs = []
        for _ in range(a.streams):
            s = engine.start([rng.randrange(vocab) for _ in range(a.prompt)], greedy)
            while not s.prefill_chunk():
                pass
            s.sample()
            seqs.append(s)

        def phase(fn, steps, tokens_per_step):
            h0, m0, t0, c0 = stats.hits, stats.misses, time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            hits, misses = stats.hits - h0, stats.misses - m0
            return steps * tokens_per_step / dt, hits / max(1, hits + misses), 1e3 * cpu / (steps * tokens_per_step)

        def alone():
            s = seqs[0]
            s.feed(engine.model.forward(torch.tensor([s.pending]), s.slot.kv)[-1])
            s.sample()

        def together():
            for s, logits in zip(seqs, decode_step(engine.model, [s.pending for s in seqs], [s.slot.kv for s in seqs])):
                s.feed(logits)
                s.sample()

        for r in range(a.rounds):
            one, one_hit, one_cpu = phase(alone, a.steps, 1)
            agg, agg_hit, agg_cpu = phase(together, a.steps, a.streams)
            rows.append({"round": r, "alone_tps": one, "together_tps": agg, "ratio": agg / one,
                         "alone_cpu_ms_per_token": one_cpu, "together_cpu_ms_per_token": agg_cpu,
                         "cpu_ratio": one_cpu / agg_cpu, "alone_hit_rate": one_hit, "together_hit_rate": agg_hit})
            print(json.dumps(rows[-1]), flush=True)
        for s in seqs:
            s.finish()
    engine.close()
    keys = ("alone_tps", "together_tps", "ratio", "alone_cpu_ms_per_token", "together_cpu_ms_per_token", "cpu_ratio")
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    spread = {k: (min(r[k] for r in rows), max(r[k] for r in rows)) for k in ("ratio", "cpu_ratio")}
    print("RESULT " + json.dumps({"median": med, "range": spread, "rows": rows}), flush=True)


if __name__ == "__main__":
    main()
