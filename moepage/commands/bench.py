"""`moepage bench MODEL`: time to first token, prefill and decode tokens/s, cache and prefetch counters, peak RSS;
`moepage bench --replay TRACE`: hit rates of every eviction policy on a recorded routing trace.

bench/bench.py runs this same measurement beside llama.cpp and transformers, inside memory cgroups.
"""
from __future__ import annotations

import json
import resource
import sys
import time

from moepage.cli import MODEL_HELP, add_engine_arguments, engine_config, model_path, size_argument
from moepage.paging.budget import parse_size


def register(sub):
    p = sub.add_parser("bench", help="measure decode/prefill speed and paging on a model, or replay a routing trace")
    p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP + " (not with --replay)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (text from Python's stdlib)")
    p.add_argument("--prompt-ids", default=None, help="JSON file with the prompt's token ids instead")
    p.add_argument("--decode", type=int, default=64, help="tokens to generate (greedy)")
    p.add_argument("--time-limit", type=float, default=300.0, help="stop decoding after this many seconds")
    p.add_argument("--json", default=None, help="write the result as JSON to this file")
    p.add_argument("--replay", default=None, metavar="TRACE", help="replay a --trace file instead of running a model")
    p.add_argument("--policies", default="lru,lfu,stale",
                   help="comma-separated policies to replay (default lru,lfu,stale)")
    p.add_argument("--capacity", default=None,
                   help="comma-separated cache sizes to replay: expert counts, or byte sizes with --expert-bytes")
    p.add_argument("--expert-bytes", type=size_argument, default=None,
                   help="bytes per expert (turns --capacity sizes into counts)")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def prompt_from_corpus(tokenizer, n: int) -> list[int]:
    """n token ids of Python standard-library source (on every machine, no download)."""
    from moepage.surgery.tokenizer_builder import local_corpus

    ids = tokenizer.encode("\n".join(local_corpus(max(60_000, 8 * n))), add_special_tokens=False)
    if len(ids) < 1000 + n:
        raise ValueError(f"the local corpus gives only {len(ids)} tokens; ask for fewer than {len(ids) - 1000}")
    return ids[1000 : 1000 + n]


def timings(t0: float, stamps: list[float], tokens: list[int], prompt: list[int]) -> dict:
    """TTFT, prefill and decode tokens/s from the time a request started and each token's arrival time."""
    ttft = stamps[0] - t0 if stamps else None
    return {
        "ttft_s": ttft, "prefill_tps": len(prompt) / ttft if ttft else None,
        "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None,
        "tokens": tokens, "n_decoded": len(tokens), "prompt_tokens": len(prompt),
    }


def measure(engine, prompt: list[int], decode: int, time_limit: float) -> dict:
    """Greedy decode after prompt; what a user sees, plus the engine's paging counters."""
    from moepage.engine.sampling import SamplingParams

    stamps, tokens = [], []
    t0 = time.perf_counter()
    for step in engine.generate(prompt, SamplingParams(max_tokens=decode, temperature=0, ignore_eos=True)):
        stamps.append(time.perf_counter())
        tokens.append(step.token)
        if stamps[-1] - t0 > time_limit:
            break
    return {
        **timings(t0, stamps, tokens, prompt),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cache": engine.cache.stats.snapshot(), "plan": engine.plan.summary(),
        "cache_capacity_experts": engine.plan.expert_cache_bytes // max(1, engine.plan.expert_bytes_each),
    }


def _replay(args) -> int:
    from moepage.paging.trace import load_trace, replay

    keys = load_trace(args.replay)
    if not keys:
        raise ValueError(f"{args.replay}: the trace is empty")
    distinct = len(set(keys))
    if args.capacity:
        caps = [parse_size(c) for c in args.capacity.split(",")]
        if args.expert_bytes:
            caps = [max(1, c // args.expert_bytes) for c in caps]
    else:
        caps = sorted({max(1, int(distinct * f)) for f in (0.1, 0.25, 0.5, 0.75)})
    policies = args.policies.split(",")
    print(f"{args.replay}: {len(keys)} accesses to {distinct} distinct experts")
    print("| capacity (experts) | " + " | ".join(f"{p} hit rate" for p in policies) + " |")
    print("|---|" + "---|" * len(policies))
    rows = []
    for cap in caps:
        results = [replay(keys, p, cap) for p in policies]
        rows.append({"capacity": cap, **{r.policy: r.hit_rate for r in results}})
        print(f"| {cap} | " + " | ".join(f"{r.hit_rate:.1%}" for r in results) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trace": args.replay, "accesses": len(keys), "rows": rows}, f, indent=1)
    return 0


def run(args) -> int:
    if args.replay:
        return _replay(args)
    from moepage.engine.engine import Engine

    engine = Engine.load(engine_config(args, model_path(args.model)))
    print(engine.memory_summary(), file=sys.stderr)
    try:
        if args.prompt_ids:
            with open(args.prompt_ids) as f:
                prompt = [int(t) for t in json.load(f)]
        else:
            if engine.tokenizer is None:
                raise ValueError("the model has no tokenizer: pass --prompt-ids")
            prompt = prompt_from_corpus(engine.tokenizer, args.prompt_tokens)
        out = measure(engine, prompt, args.decode, args.time_limit)
    finally:
        engine.close()
    c = out["cache"]
    print(f"prompt {out['prompt_tokens']} tokens: TTFT {out['ttft_s']:.3f}s ({out['prefill_tps']:.1f} tok/s); "
          f"decode {out['n_decoded']} tokens at {out['decode_tps'] or 0:.2f} tok/s; peak RSS "
          f"{out['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"expert cache hit rate {c['hit_rate']:.1%}, page-in p50 {c['page_in_p50_s'] * 1e3:.2f} ms p99 "
          f"{c['page_in_p99_s'] * 1e3:.2f} ms, read {c['bytes_read'] / 2**20:.0f} MiB; prefetch issued "
          f"{c['prefetch_issued']} used {c['prefetch_used']}; pre-gating precision {c['guess_precision']:.1%} "
          f"recall {c['guess_recall']:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
