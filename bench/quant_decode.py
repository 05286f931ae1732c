"""Resident decode of one quantized GGUF (e.g. Q4_K_M) by moepage and by llama.cpp, alternating in one run.

    python bench/quant_decode.py MODEL.gguf [--repeats 5] [--decode 64] [--prompt-tokens 128] [--threads 2] [--burn 1]

Each run is a fresh process (bench/run_one.py) on the same prompt ids; moepage and llama.cpp alternate so drift in
a shared machine's memory bandwidth hits both alike. Prints every run's decode tok/s, each system's median and
range, the ratio of the medians and the run-by-run ratios, and whether the greedy tokens agree (up to the first
difference: a router near-tie flips a random model's tokens, see tests/test_gguf.py). --burn N keeps N CPU-burning
processes running beside every run (a busy laptop).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


# llama.cpp in a process that never imports moepage (whose import sets OMP_WAIT_POLICY): its own defaults
LLAMA_CPP = """
import json, resource, sys, time
from llama_cpp import Llama
gguf, prompt_file, decode, threads, ctx, limit = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), float(sys.argv[6])
prompt = json.load(open(prompt_file))
llm = Llama(model_path=gguf, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False, n_batch=512)
stamps, tokens = [], []
t0 = time.perf_counter()
for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
    stamps.append(time.perf_counter())
    tokens.append(int(tok))
    if len(tokens) >= decode or stamps[-1] - t0 > limit:
        break
out = {"tokens": tokens, "prefill_tps": len(prompt) / (stamps[0] - t0),
       "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None,
       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
print("RESULT " + json.dumps(out))
"""


def run(system: str, gguf: str, prompt_file: str, a) -> dict:
    ctx = str(a.prompt_tokens + a.decode + 64)
    env = dict(os.environ)
    if system.startswith("llamacpp"):
        cmd = [sys.executable, "-c", LLAMA_CPP, gguf, prompt_file, str(a.decode), str(a.threads), ctx,
               str(a.time_limit)]
        env.pop("OMP_WAIT_POLICY", None)
        if system == "llamacpp-passive":  # its OpenMP threads sleep instead of spinning, as moepage's do
            env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        cmd = [sys.executable, os.path.join(HERE, "run_one.py"), system, "--model", gguf, "--prompt-ids", prompt_file,
               "--decode", str(a.decode), "--threads", str(a.threads), "--ctx", ctx, "--time-limit", str(a.time_limit),
               "--dtype", a.dtype]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.time_limit * 3 + 600, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"system": system, "error": f"exit {p.returncode}: {p.stderr[-400:]}"}
    return json.loads(line[len("RESULT "):])


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--vocab", type=int, default=4096, help="prompt ids are drawn below this (seed 0)")
    ap.add_argument("--dtype", default="auto", help="moepage's compute dtype (auto: bfloat16 for a quantized file)")
    ap.add_argument("--burn", type=int, default=0, help="CPU-burning neighbour processes during the runs")
    ap.add_argument("--llama-passive", action="store_true",
                    help="also run llama.cpp with OMP_WAIT_POLICY=PASSIVE (its threads sleep between jobs, as moepage's do)")
    a = ap.parse_args()
    rng = random.Random(0)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([rng.randrange(a.vocab) for _ in range(a.prompt_tokens)], f)
        prompt_file = f.name
    systems = ["moepage", "llamacpp"] + (["llamacpp-passive"] if a.llama_passive else [])
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.burn)]
    try:
        for rep in range(a.repeats):
            for system in systems if rep % 2 == 0 else systems[::-1]:
                r = run(system, a.gguf, prompt_file, a)
                runs[system].append(r)
                print(f"run {rep} {system}: " + (f"{r['decode_tps']:.2f} tok/s decode, {r.get('prefill_tps', 0):.1f} "
                      f"tok/s prefill" if r.get("decode_tps") else r.get("error", "?")), file=sys.stderr, flush=True)
    finally:
        for p in burners:
            p.kill()
            p.wait()
        os.unlink(prompt_file)
    rates = {s: [r["decode_tps"] for r in rs if r.get("decode_tps")] for s, rs in runs.items()}
    if not all(rates.values()):
        sys.exit(f"a system produced no decode rate: {runs}")
    med = {s: statistics.median(v) for s, v in rates.items()}
    ours, theirs = runs["moepage"][0].get("tokens", []), runs["llamacpp"][0].get("tokens", [])
    print(f"{os.path.basename(a.gguf)}: {a.threads} threads, prompt {a.prompt_tokens} tokens, decode {a.decode}, "
          f"{a.repeats} alternating runs each" + (f", {a.burn} CPU-burning neighbour(s)" if a.burn else ""))
    for s in systems:
        rss = max(r.get("peak_rss_bytes", 0) for r in runs[s]) / 2**20
        print(f"  {s:16s} decode median {med[s]:.2f} tok/s (range {min(rates[s]):.2f}-{max(rates[s]):.2f}; runs "
              + ", ".join(f"{x:.2f}" for x in rates[s]) + f"), peak RSS {rss:.0f} MiB")
    for peer in systems[1:]:
        pairs = [m / p for m, p in zip(rates["moepage"], rates[peer])]
        print(f"  moepage / {peer}: {med['moepage'] / med[peer]:.2f}x of the medians; run by run "
              + ", ".join(f"{x:.2f}x" for x in pairs))
    print(f"  greedy tokens equal for the first {agreement(ours, theirs)} of {min(len(ours), len(theirs))}")


if __name__ == "__main__":
    main()
