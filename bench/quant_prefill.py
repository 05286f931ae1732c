"""Prefill (prompt processing) of one quantized GGUF by moepage and by llama.cpp, alternating in one run, at several
prompt lengths, resident and under cgroup memory caps.

    python bench/quant_prefill.py MODEL.gguf [--prompt-tokens 128,2048] [--repeats 3] [--threads 2]
        [--caps 1,0.5] [--peers default,passive,norepack] [--json PATH]

Each run is a fresh process (bench/quant_decode.py's children) that prefills the same random prompt ids and decodes
2 tokens; prefill tok/s = prompt tokens / time to the first token (model loading excluded), and the process CPU time
per prompt token (all threads; what the prefill costs whatever the machine's load). Per length and cap it prints
every run, each system's medians, the ratio of the medians and the run-by-run ratios. Capped rows
need root and cgroup v1 (page cache dropped before each run; moepage gets --memory-budget = cap - --overhead).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import can_cap  # noqa: E402
from peers import alternate  # noqa: E402
from quant_decode import run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--prompt-tokens", default="128,2048", help="prompt lengths, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per run at most")
    ap.add_argument("--vocab", type=int, default=4096, help="prompt ids are drawn below this (seed 0)")
    ap.add_argument("--caps", default="1", help="memory caps as fractions of the GGUF file's bytes (1 = none)")
    ap.add_argument("--cap-base", type=int, default=0, help="bytes added to every cap")
    ap.add_argument("--overhead", type=int, default=330 << 20,
                    help="bytes of a cap left outside moepage's --memory-budget (Python, torch, buffers)")
    ap.add_argument("--llama", default=None,
                    help="directory of another llama-cpp-python build for the llama.cpp runs (pip install --target)")
    ap.add_argument("--peers", default="default",
                    help="llama.cpp variants, comma-separated: default, passive, norepack, norepack-passive")
    ap.add_argument("--json", default=None, help="also write every run's result to this JSON file")
    a = ap.parse_args()
    systems = ["moepage"] + [{"default": "llamacpp"}.get(p, f"llamacpp-{p}") for p in a.peers.split(",")]
    size = os.path.getsize(a.gguf)
    results = []
    for n in (int(x) for x in a.prompt_tokens.split(",")):
        rng = random.Random(0)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([rng.randrange(a.vocab) for _ in range(n)], f)
            prompt_file = f.name
        child = argparse.Namespace(prompt_tokens=n, decode=2, threads=a.threads, time_limit=a.time_limit,
                                   overhead=a.overhead, burn=0, llama=a.llama)
        try:
            for cap in (float(c) for c in a.caps.split(",")):
                limit = None if cap >= 1 else int(cap * size) + a.cap_base
                if limit and not can_cap():
                    print(f"skipping the {cap:.0%} cap: needs root and cgroup v1 memory", file=sys.stderr)
                    continue
                runs = alternate(systems, a.repeats, lambda system: run(system, a.gguf, prompt_file, child, limit),
                                 lambda rep, system, r: f"{n} tokens, cap {cap:.0%}, run {rep} {system}: " + (
                                     f"{r['prefill_tps']:.1f} tok/s prefill, "
                                     f"{r.get('prefill_cpu_ms_per_token') or 0:.2f} CPU ms/token" if r.get("prefill_tps")
                                     else r.get("error", "?")[:300]))
                label = (f"{os.path.basename(a.gguf)}, {n}-token prompt, {a.threads} threads, " +
                         (f"cap {cap:.0%} = {limit / 2**20:.0f} MiB" if limit else "no cap"))
                report(label, systems, runs)
                results.append({"label": label, "prompt_tokens": n, "cap": cap, "limit_bytes": limit, "runs": runs})
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump({"args": vars(a), "gguf_bytes": size, "rows": results}, f, indent=1)
        finally:
            os.unlink(prompt_file)


def report(label: str, systems: list[str], runs: dict[str, list[dict]]) -> None:
    rates = {s: [r["prefill_tps"] for r in rs if r.get("prefill_tps")] for s, rs in runs.items()}
    print(label, flush=True)
    for s in systems:
        if not rates[s]:
            print(f"  {s:17s} no prefill rate: " + "; ".join(r.get("error", "?")[:160] for r in runs[s]))
            continue
        cpu = [r["prefill_cpu_ms_per_token"] for r in runs[s] if r.get("prefill_cpu_ms_per_token")]
        print(f"  {s:17s} prefill median {statistics.median(rates[s]):.1f} tok/s (runs "
              + ", ".join(f"{x:.1f}" for x in rates[s]) + ")"
              + (f", CPU {statistics.median(cpu):.2f} ms per prompt token (all threads)" if cpu else ""))
    for peer in systems[1:]:
        if rates["moepage"] and rates[peer] and len(rates["moepage"]) == len(rates[peer]):
            pairs = [m / p for m, p in zip(rates["moepage"], rates[peer])]
            print(f"  moepage / {peer}: {statistics.median(rates['moepage']) / statistics.median(rates[peer]):.2f}x "
                  "of the medians; run by run " + ", ".join(f"{x:.2f}x" for x in pairs), flush=True)


if __name__ == "__main__":
    main()
