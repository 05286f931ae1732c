"""Decode of one quantized GGUF (e.g. Q4_K_M) by moepage and by llama.cpp, alternating in one run: resident, under
cgroup memory caps, and beside CPU-burning neighbours.

    python bench/quant_decode.py MODEL.gguf [--repeats 5] [--decode 64] [--prompt-tokens 128] [--threads 2]
        [--caps 1,0.5,0.3] [--burn 1] [--llama-passive] [--llama-norepack] [--llama DIR]

Each run is a fresh process on the same prompt ids; the systems alternate (order reversed every other repeat) so
drift in a shared machine's memory bandwidth and load hits them alike. Per cap (a fraction of the GGUF file's
bytes, plus --cap-base; 1 = none; capped rows need root and cgroup v1, page cache dropped before each run, moepage
given --memory-budget = cap - --overhead) it prints every run's decode tok/s, each system's median and range, the
process CPU time per decoded token (user + system, all threads: what the step costs, whatever the machine's load),
the ratio of the medians and the run-by-run ratios, and whether the greedy tokens agree (up to the first difference: a
router near-tie flips a random model's tokens, see tests/test_gguf.py). --burn N keeps N CPU-burning processes
running beside every run (a busy laptop). Systems: moepage (its defaults), llamacpp (its defaults: OpenMP
spin-waiting, Q4_K repacked into anonymous memory at load), llamacpp-passive (OMP_WAIT_POLICY=PASSIVE),
llamacpp-norepack (repacking off: weights stay in the file's mmap, as under a cap they must to start at all),
llamacpp-norepack-passive (both). --json PATH writes every run's result.
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
sys.path.insert(0, HERE)
from bench import can_cap, drop_caches, make_cgroup  # noqa: E402
from peers import agreement, alternate, run_result  # noqa: E402

# Both children: greedy decode after the prompt; decode tok/s from token arrival times, process CPU seconds between
# the first and the last token, peak RSS.
TAIL = """
out = {"tokens": tokens, "prefill_tps": len(prompt) / (stamps[0] - t0),
       "prefill_cpu_ms_per_token": 1e3 * (cpu[0] - c0) / len(prompt),
       "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None,
       "cpu_ms_per_token": 1e3 * (cpu[-1] - cpu[0]) / (len(cpu) - 1) if len(cpu) > 1 else None,
       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
print("RESULT " + json.dumps(out))
"""
HEAD = """
import json, resource, sys, time
gguf, prompt_file, decode, threads, ctx, limit, budget = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), \\
    float(sys.argv[6]), int(sys.argv[7])
prompt = json.load(open(prompt_file))
stamps, tokens, cpu = [], [], []
"""
# llama.cpp in a process that never imports moepage (whose import sets OMP_WAIT_POLICY): its own defaults
LLAMA_CPP = HEAD + """
import llama_cpp.llama_cpp as lib
from llama_cpp import Llama
if budget < 0:  # llamacpp-norepack: llama.cpp's --no-repack
    sys.path.insert(0, "bench")
    from peers import llama_no_repack
    llama_no_repack(lib)
llm = Llama(model_path=gguf, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False, n_batch=512)
t0, c0 = time.perf_counter(), time.process_time()
for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    tokens.append(int(tok))
    if len(tokens) >= decode or stamps[-1] - t0 > limit:
        break
""" + TAIL
MOEPAGE = HEAD + """
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.sampling import SamplingParams
engine = Engine.load(EngineConfig(gguf, memory_budget=budget or None, ctx_size=ctx, threads=threads, tokenizer=False))
t0, c0 = time.perf_counter(), time.process_time()
for step in engine.generate(prompt, SamplingParams(max_tokens=decode, temperature=0, ignore_eos=True)):
    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    tokens.append(step.token)
    if stamps[-1] - t0 > limit:
        break
engine.close()
""" + TAIL


def run(system: str, gguf: str, prompt_file: str, a, limit: int | None) -> dict:
    ctx = str(a.prompt_tokens + a.decode + 64)
    env = dict(os.environ)
    ours = system.startswith("moepage")
    budget = limit - a.overhead if limit and ours else (-1 if "norepack" in system else 0)
    threads = system.split("-t")[1].split("-")[0] if system.startswith("moepage-t") else str(a.threads)
    cmd = [sys.executable, "-c", MOEPAGE if ours else LLAMA_CPP, gguf, prompt_file, str(a.decode), threads, ctx,
           str(a.time_limit), str(budget)]
    if system.startswith("llamacpp"):
        env.pop("OMP_WAIT_POLICY", None)
        if getattr(a, "llama", None):  # another llama-cpp-python build (e.g. without AMX) for the llama.cpp child only
            env["PYTHONPATH"] = os.pathsep.join(p for p in (a.llama, env.get("PYTHONPATH")) if p)
        if system.endswith("passive"):  # its OpenMP threads sleep instead of spinning, as moepage's do
            env["OMP_WAIT_POLICY"] = "PASSIVE"
    cgroup = make_cgroup(f"moepage-quant-{limit}", limit) if limit else None
    if cgroup and ours:  # kernels built outside the cap: a compiler inside it would be OOM-killed
        subprocess.run([sys.executable, "-m", "moepage.kernels.native"], capture_output=True, cwd=os.path.dirname(HERE))

    if cgroup:
        drop_caches()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(0 if system.endswith("-idle") else a.burn)]
    try:
        return run_result(system, cmd, cgroup, env, a.time_limit * 3 + 600, os.path.dirname(HERE))
    finally:
        for p in burners:
            p.kill()
            p.wait()


def report(label: str, systems: list[str], runs: dict[str, list[dict]], a) -> None:
    rates = {s: [r["decode_tps"] for r in rs if r.get("decode_tps")] for s, rs in runs.items()}
    print(f"{label}: {a.threads} threads, prompt {a.prompt_tokens} tokens, decode {a.decode}, {a.repeats} "
          f"alternating runs each" + (f", {a.burn} CPU-burning neighbour(s)" if a.burn else ""), flush=True)
    for s in systems:
        if not rates[s]:
            print(f"  {s:17s} no decode rate: " + "; ".join(r.get("error", "?")[:160] for r in runs[s]))
            continue
        rss = max(r.get("peak_rss_bytes", 0) for r in runs[s]) / 2**20
        cpu = statistics.median(r["cpu_ms_per_token"] for r in runs[s] if r.get("cpu_ms_per_token"))
        print(f"  {s:17s} decode median {statistics.median(rates[s]):.2f} tok/s (range {min(rates[s]):.2f}-"
              f"{max(rates[s]):.2f}; runs " + ", ".join(f"{x:.2f}" for x in rates[s]) + f"), CPU {cpu:.1f} ms/token, "
              f"peak RSS {rss:.0f} MiB")
    first = systems[0]
    for peer in systems[1:]:
        if rates[first] and rates[peer]:
            pairs = [m / p for m, p in zip(rates[first], rates[peer])]
            print(f"  {first} / {peer}: {statistics.median(rates[first]) / statistics.median(rates[peer]):.2f}x "
                  "of the medians; run by run " + ", ".join(f"{x:.2f}x" for x in pairs))
    ours = next((r.get("tokens", []) for r in runs[first] if r.get("tokens")), [])
    for peer in systems[1:]:
        theirs = next((r.get("tokens", []) for r in runs[peer] if r.get("tokens")), [])
        if ours and theirs:
            print(f"  greedy tokens equal to {peer}'s for the first {agreement(ours, theirs)} of "
                  f"{min(len(ours), len(theirs))}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds of decoding per run at most")
    ap.add_argument("--vocab", type=int, default=4096, help="prompt ids are drawn below this (seed 0)")
    ap.add_argument("--caps", default="1", help="memory caps as fractions of the GGUF file's bytes (1 = none)")
    ap.add_argument("--cap-base", type=int, default=0,
                    help="bytes added to every cap (e.g. a process baseline, so both systems can start at low caps)")
    ap.add_argument("--overhead", type=int, default=330 << 20,
                    help="bytes of a cap left outside moepage's --memory-budget (Python, torch, buffers)")
    ap.add_argument("--burn", type=int, default=0, help="CPU-burning neighbour processes during each run")
    ap.add_argument("--moepage", default=None,
                    help="moepage's variants instead of one at --threads, comma-separated: tN (N threads; t0 = its "
                         "default), tN-idle (without the --burn neighbours), e.g. t0,t0-idle,t1")
    ap.add_argument("--llama-passive", action="store_true",
                    help="also run llama.cpp with OMP_WAIT_POLICY=PASSIVE (its threads sleep between jobs, as moepage's do)")
    ap.add_argument("--llama-norepack", action="store_true", help="also run llama.cpp with repacking off")
    ap.add_argument("--peers", default=None,
                    help="the llama.cpp variants to run instead, comma-separated: default, passive, norepack, "
                         "norepack-passive")
    ap.add_argument("--llama", default=None,
                    help="directory of another llama-cpp-python build for the llama.cpp runs (pip install --target)")
    ap.add_argument("--json", default=None, help="also write every run's result, per cap, to this JSON file")
    a = ap.parse_args()
    rng = random.Random(0)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([rng.randrange(a.vocab) for _ in range(a.prompt_tokens)], f)
        prompt_file = f.name
    ours = [f"moepage-{v}" for v in a.moepage.split(",")] if a.moepage else ["moepage"]
    if a.peers is not None:  # --peers "" runs moepage alone
        systems = ours + [{"default": "llamacpp"}.get(p, f"llamacpp-{p}") for p in a.peers.split(",") if p]
    else:
        systems = (ours + ["llamacpp"] + (["llamacpp-passive"] if a.llama_passive else [])
                   + (["llamacpp-norepack"] if a.llama_norepack else []))
    size = os.path.getsize(a.gguf)
    results: list[dict] = []
    try:
        for cap in (float(c) for c in a.caps.split(",")):
            limit = None if cap >= 1 else int(cap * size) + a.cap_base
            if limit and not can_cap():
                print(f"skipping the {cap:.0%} cap: needs root and cgroup v1 memory", file=sys.stderr)
                continue
            runs = alternate(systems, a.repeats, lambda system: run(system, a.gguf, prompt_file, a, limit),
                             lambda rep, system, r: f"cap {cap:.0%} run {rep} {system}: " + (
                                 f"{r['decode_tps']:.2f} tok/s decode, {r.get('prefill_tps', 0):.1f} tok/s prefill, "
                                 f"{r.get('cpu_ms_per_token') or 0:.1f} CPU ms/token" if r.get("decode_tps")
                                 else r.get("error", "?")[:300]))
            label = os.path.basename(a.gguf) + (f", cap {cap:.0%}" + (f" + {a.cap_base / 2**20:.0f} MiB" if a.cap_base
                                                                       else "") + f" = {limit / 2**20:.0f} MiB"
                                                 if limit else ", no cap")
            report(label, systems, runs, a)
            results.append({"label": label, "cap": cap, "limit_bytes": limit, "runs": runs})
            if a.json:
                with open(a.json, "w") as f:
                    json.dump({"args": vars(a), "gguf_bytes": size, "caps": results}, f, indent=1)
    finally:
        os.unlink(prompt_file)


if __name__ == "__main__":
    main()
