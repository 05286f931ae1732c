"""The AVX2 rows: moepage with its kernels built for AVX2 only (MOEPAGE_KERNEL_ARCH=haswell: AVX2 + FMA + F16C, no
AVX-512) against llama.cpp built without AVX-512, on one machine, resident decode, bf16 and Q4_K_M.

    # llama.cpp without AVX-512 (once, ~10 min on 2 cores), from the sdist tests use:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_FMA=ON -DGGML_F16C=ON" \
        pip install --no-cache-dir --no-deps --no-binary :all: --target /work/benchdata/llama-avx2 \
        llama-cpp-python==0.3.36
    (--no-cache-dir: otherwise pip reuses the native wheel it built for the [test] extra, CMAKE_ARGS ignored; the
    script refuses a llama.cpp whose system info has AVX512 = 1)
    python bench/avx2_decode.py --bf16 DIR BF16.gguf --q4 Q4_K_M.gguf --llama /work/benchdata/llama-avx2 [--repeats 3]

Each run is a fresh process on the same prompt ids (greedy; decode tok/s from token arrival times, and the process's
CPU time per decoded token, all threads, which a loaded machine moves less); moepage and llama.cpp alternate. Before the runs it prints what each side was built for: moepage's bf16 core (`portable` under haswell)
and llama.cpp's system info (AVX512 = 0). Prints each system's median and range, the ratio of the medians, the
run-by-run ratios and how many greedy tokens agree.
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
from peers import agreement, run_result  # noqa: E402

# llama.cpp in a process that never imports moepage (whose import sets OMP_WAIT_POLICY): greedy decode after the
# prompt, decode tok/s from token arrival times
LLAMA_CPP = """
import json, sys, time
from llama_cpp import Llama
gguf, prompt_file, decode, threads, ctx, limit = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), float(sys.argv[6])
prompt = json.load(open(prompt_file))
llm = Llama(model_path=gguf, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False, n_batch=512)
stamps, cpu, tokens = [], [], []
t0 = time.perf_counter()
for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    tokens.append(int(tok))
    if len(tokens) >= decode or stamps[-1] - t0 > limit:
        break
n = len(stamps) - 1
print("RESULT " + json.dumps({"tokens": tokens, "decode_tps": n / (stamps[-1] - stamps[0]) if n else None,
                              "cpu_ms_per_token": 1e3 * (cpu[-1] - cpu[0]) / n if n else None}))
"""

# moepage the same way (greedy, token arrival times; CPU time of all the process's threads per decoded token)
MOEPAGE = """
import json, sys, time
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.sampling import SamplingParams
model, prompt_file, decode, threads, ctx, limit = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), float(sys.argv[6])
prompt = json.load(open(prompt_file))
engine = Engine.load(EngineConfig(model, ctx_size=ctx, threads=threads, tokenizer=False))
stamps, cpu, tokens = [], [], []
t0 = time.perf_counter()
for step in engine.generate(prompt, SamplingParams(max_tokens=decode, temperature=0, ignore_eos=True)):
    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    tokens.append(step.token)
    if stamps[-1] - t0 > limit:
        break
engine.close()
n = len(stamps) - 1
print("RESULT " + json.dumps({"tokens": tokens, "decode_tps": n / (stamps[-1] - stamps[0]) if n else None,
                              "cpu_ms_per_token": 1e3 * (cpu[-1] - cpu[0]) / n if n else None}))
"""

MOEPAGE_CORE = "from moepage.kernels import native; m = native.load('bf16_decode'); print(m.core() if m else 'torch')"
LLAMA_INFO = "import llama_cpp; print(llama_cpp.__file__); print(llama_cpp.llama_print_system_info().decode())"


def environment(system: str, a) -> dict:
    env = dict(os.environ)
    if system == "moepage":
        env["MOEPAGE_KERNEL_ARCH"] = a.arch
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(HERE), env.get("PYTHONPATH")) if p)
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (a.llama, env.get("PYTHONPATH")) if p)
        env.pop("OMP_WAIT_POLICY", None)
        if system == "llamacpp-passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def run(system: str, model: str, gguf: str, prompt_file: str, a) -> dict:
    ctx = str(a.prompt_tokens + a.decode + 64)
    cmd = [sys.executable, "-c", MOEPAGE if system == "moepage" else LLAMA_CPP, model if system == "moepage" else gguf,
           prompt_file, str(a.decode), str(a.threads), ctx, str(a.time_limit)]
    return run_result(system, cmd, env=environment(system, a), timeout=a.time_limit * 3 + 900)


def row(name: str, model: str, gguf: str, prompt_file: str, systems: list[str], a):
    runs = {s: [] for s in systems}
    for rep in range(a.repeats):
        for system in systems if rep % 2 == 0 else systems[::-1]:
            r = run(system, model, gguf, prompt_file, a)
            runs[system].append(r)
            print(f"{name} run {rep} {system}: " + (f"{r['decode_tps']:.2f} tok/s, {r['cpu_ms_per_token']:.1f} CPU "
                                                    f"ms/token, load average {os.getloadavg()[0]:.1f}"
                                                    if r.get("decode_tps") else r.get("error", "?")),
                  file=sys.stderr, flush=True)
    rates = {s: [r["decode_tps"] for r in rs if r.get("decode_tps")] for s, rs in runs.items()}
    if not all(rates.values()):
        print(f"{name}: a system produced no decode rate: {runs}")
        return
    med = {s: statistics.median(v) for s, v in rates.items()}
    print(f"{name}: moepage {os.path.basename(model)} vs llama.cpp {os.path.basename(gguf)}, {a.threads} threads, "
          f"prompt {a.prompt_tokens}, decode {a.decode}, {a.repeats} alternating runs each")
    for s in systems:
        cpu = statistics.median(r["cpu_ms_per_token"] for r in runs[s] if r.get("cpu_ms_per_token"))
        print(f"  {s:16s} decode median {med[s]:.2f} tok/s (range {min(rates[s]):.2f}-{max(rates[s]):.2f}; runs "
              + ", ".join(f"{x:.2f}" for x in rates[s]) + f"); CPU {cpu:.1f} ms/token (median)")
    for peer in systems[1:]:
        pairs = [m / p for m, p in zip(rates["moepage"], rates[peer])]
        print(f"  moepage / {peer}: {med['moepage'] / med[peer]:.2f}x of the medians; run by run "
              + ", ".join(f"{x:.2f}x" for x in pairs))
    ours, theirs = runs["moepage"][0].get("tokens", []), runs[systems[1]][0].get("tokens", [])
    print(f"  greedy tokens equal for the first {agreement(ours, theirs)} of {min(len(ours), len(theirs))}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bf16", nargs=2, metavar=("MODEL_DIR", "GGUF"), help="the bf16 checkpoint and its bf16 GGUF")
    ap.add_argument("--q4", metavar="GGUF", help="a Q4_K_M GGUF (both systems read it)")
    ap.add_argument("--llama", required=True, help="directory of a llama-cpp-python built without AVX-512")
    ap.add_argument("--arch", default="haswell", help="MOEPAGE_KERNEL_ARCH for moepage (default haswell: AVX2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=90.0)
    ap.add_argument("--vocab", type=int, default=4096, help="prompt ids are drawn below this (seed 0)")
    ap.add_argument("--llama-passive", action="store_true", help="also llama.cpp with OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--no-llama-default", action="store_true",
                    help="skip llama.cpp with its default (spin-waiting) threads: with --llama-passive, the passive peer only")
    a = ap.parse_args()
    a.dtype = "auto"
    for what, code, system in (("moepage bf16 core", MOEPAGE_CORE, "moepage"), ("llama.cpp", LLAMA_INFO, "llamacpp")):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                           env=environment(system, a))
        print(f"{what}: " + (p.stdout.strip() or p.stderr[-400:]).replace("\n", " | "), flush=True)
        if system == "llamacpp" and "AVX512 = 1" in p.stdout:
            sys.exit("this llama.cpp was built with AVX-512 (a cached native wheel?): rebuild it with "
                     "--no-cache-dir")
    rng = random.Random(0)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([rng.randrange(a.vocab) for _ in range(a.prompt_tokens)], f)
        prompt_file = f.name
    systems = ["moepage"] + ([] if a.no_llama_default and a.llama_passive else ["llamacpp"]) + (
        ["llamacpp-passive"] if a.llama_passive else [])
    try:
        if a.bf16:
            row("bf16", a.bf16[0], a.bf16[1], prompt_file, systems, a)
        if a.q4:
            row("Q4_K_M", a.q4, a.q4, prompt_file, systems, a)
    finally:
        os.unlink(prompt_file)


if __name__ == "__main__":
    main()
