"""The secretary on vs off: expert cache hit rate and time to first token when requests switch domains.

    python bench/secretary.py [--model moepage/demo_model] [--profile moepage/demo_model/profile.json]
                              [--fraction 0.3] [--requests 40]

Requests cycle through the profile's domains (code, prose, c_headers, shell on the demo model), each the start
of a held-out file of that domain (from the demo model's corpus manifest), so every request arrives with the
previous domain's experts in the cache. Both runs see the same requests and produce the same tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from moepage.demo import SHIPPED_DIR  # noqa: E402
from moepage.engine.engine import Engine, EngineConfig  # noqa: E402
from moepage.engine.moe import PreparedExpert  # noqa: E402
from moepage.engine.sampling import SamplingParams  # noqa: E402


def heldout_prompts(manifest_path: str, per_domain: int, tokens: int, tokenizer) -> dict[str, list[list[int]]]:
    from moepage.surgery.profile import read_sources

    with open(manifest_path) as f:
        manifest = json.load(f)
    out = {}
    for domain, files in manifest["files"].items():
        paths = [e["path"] for e in files if e["split"] == "heldout" and os.path.exists(e["path"])][:per_domain]
        texts = [s.text for p in paths for s in read_sources([p], domain)]
        out[domain] = [tokenizer.encode(t)[:tokens] for t in texts if t.strip()]
    return out


def run(model: str, cache_bytes: int, profile: str | None, order: list[tuple[str, list[int]]], decode: int) -> dict:
    engine = Engine.load(EngineConfig(model, expert_cache_bytes=cache_bytes, secretary=profile))
    params = SamplingParams(max_tokens=decode, temperature=0, ignore_eos=True)
    ttft, tokens, misses = [], [], []
    for _, ids in order:
        before = engine.cache.stats.misses
        t0 = time.perf_counter()
        out = []
        for i, step in enumerate(engine.generate(ids, params)):
            if i == 0:
                ttft.append(time.perf_counter() - t0)
            out.append(step.token)
        tokens.append(out)
        misses.append(engine.cache.stats.misses - before)
    stats = engine.cache.stats.snapshot()
    sec = engine.secretary.snapshot() if engine.secretary else None
    engine.close()
    return {"ttft_median_s": statistics.median(ttft), "hit_rate": stats["hit_rate"], "misses": sum(misses),
            "misses_per_request": sum(misses) / len(order), "tokens": tokens, "secretary": sec}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHIPPED_DIR))
    ap.add_argument("--profile", default=os.path.join(SHIPPED_DIR, "profile.json"))
    ap.add_argument("--manifest", default=os.path.join(SHIPPED_DIR, "corpus.manifest.json"))
    ap.add_argument("--fraction", type=float, default=0.3, help="expert cache as a fraction of all experts")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(HERE, "out", "secretary.json"))
    a = ap.parse_args()
    probe = Engine.load(EngineConfig(a.model))
    args, tk, dtype = probe.args, probe.tokenizer, probe.model.dtype
    probe.close()
    each = PreparedExpert.nbytes_for(args.hidden_size, args.moe_intermediate_size, dtype)
    total = len(args.moe_layers) * args.num_experts
    capacity = max(args.top_k, int(total * a.fraction))
    prompts = heldout_prompts(a.manifest, a.requests, a.prompt_tokens, tk)
    domains = sorted(d for d in prompts if prompts[d])
    order = [(domains[i % len(domains)], prompts[domains[i % len(domains)]][(i // len(domains)) % len(prompts[domains[i % len(domains)]])])
             for i in range(a.requests)]
    off = run(a.model, capacity * each, None, order, a.decode)
    on = run(a.model, capacity * each, a.profile, order, a.decode)
    same = on["tokens"] == off["tokens"]
    lines = [
        f"{a.model}: {total} experts, expert cache {capacity} ({a.fraction:.0%}); {a.requests} requests cycling "
        f"{', '.join(domains)}, {a.prompt_tokens}-token held-out prompts, {a.decode} tokens each",
        "",
        "| secretary | expert cache hit rate | expert misses per request | median TTFT ms |",
        "|---|---|---|---|",
        f"| off | {off['hit_rate']:.1%} | {off['misses_per_request']:.2f} | {off['ttft_median_s'] * 1e3:.1f} |",
        f"| on | {on['hit_rate']:.1%} | {on['misses_per_request']:.2f} | {on['ttft_median_s'] * 1e3:.1f} |",
        "",
        f"secretary predictions {on['secretary']['predictions']}; prefetch issued {on['secretary']['prefetch_issued']}, "
        f"used {on['secretary']['prefetch_used']} (precision {on['secretary']['prefetch_precision']:.1%}); "
        f"same tokens with and without: {'yes' if same else 'NO'}",
    ]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"off": off, "on": on, "table": "\n".join(lines), "command": " ".join(sys.argv)}, f, indent=1)


if __name__ == "__main__":
    main()
