"""The full-shape proof: one synthetic Qwen3-30B-A3B Q4_K_M GGUF (bench/synthetic_gguf.py, 18.6 GB) served by
moepage and by llama.cpp (mmap, as users run it) inside cgroup memory caps, uniform and skewed routing.

    python bench/fullsize.py --gguf qwen3-30b-a3b-Q4_K_M.gguf [--caps 12,8,6] [--routings uniform,skewed]
        [--decode 64] [--ttft-cap 8] [--ttft-tokens 2048] [--llama-time 120] [--out bench/results/fullsize]

Per row: decode tok/s over --decode tokens with seeded sampling (temperature 1, top-k 40, seed 0: the same
tokens at every cap iff paging changed no logit), start-up seconds, peak memory (the cgroup's
memory.max_usage_in_bytes, page cache included), expert hit rate, distinct experts per token, the overlap between
consecutive tokens' experts, bytes missed per token and the disk ceiling (the O_DIRECT read rate of expert-sized
slices measured in the same run / bytes missed per token). TTFT for a --ttft-tokens prompt at --ttft-cap.
--routings patches the file's routers in place between passes (synthetic_gguf.py --patch-routing).
--systems also takes llamacpp-norepack: llama.cpp with repacking off (its --no-repack), so its weights stay in
the mmap instead of being copied into anonymous memory at load (which a cap below the file's size OOM-kills).
Writes OUT/fullsize.json and OUT/fullsize.png.

    python bench/fullsize.py --combine OUT_DIR A.json B.json ...   # passes merged: OUT_DIR/fullsize.json + .png
    python bench/fullsize.py --serve-startup FILE OUT.json [CAP_GIB ...]   # `moepage serve` to its first /health
        200 (cap 0: no cgroup, --memory-budget 12 GiB: all 17.5 GiB of experts would need more than this machine
        gives one process) Needs root (cgroup v1 memory controller, drop_caches).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as caps  # noqa: E402  (cgroup helpers)
import synthetic_gguf  # noqa: E402

GiB = 1 << 30
SAMPLING = dict(temperature=1.0, top_k=40, seed=0)


# ---- children (run inside the cgroup) ------------------------------------------------------------------
def per_token_sets(trace: str, skip: int) -> list[set]:
    """The trace's accesses after the first `skip`, grouped per token (a token's layers come in rising order)."""
    tokens, cur, last = [], set(), -1
    with open(trace) as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            r = json.loads(line)
            if r["l"] < last and cur:
                tokens.append(cur)
                cur = set()
            cur.add((r["l"], r["e"]))
            last = r["l"]
    if cur:
        tokens.append(cur)
    return tokens


def child_moepage(a, prompt: list[int]) -> dict:
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.sampling import SamplingParams
    from moepage.paging.trace import TraceRecorder

    t0 = time.perf_counter()
    engine = Engine.load(EngineConfig(a.gguf, memory_budget=a.budget, ctx_size=a.ctx, threads=a.threads,
                                      io_threads=a.io_threads, trace=a.trace, tokenizer=False, pregate=a.pregate))
    startup = time.perf_counter() - t0
    rec = next((cb for cb in engine.cache.on_access if isinstance(cb, TraceRecorder)), None)
    stamps, tokens, before, skip = [], [], None, 0
    t1 = time.perf_counter()
    params = SamplingParams(max_tokens=a.decode, ignore_eos=True, **SAMPLING)
    for step in engine.generate(prompt, params):
        stamps.append(time.perf_counter())
        tokens.append(step.token)
        if before is None:  # the prompt is done: decode counters start here
            before, skip = engine.cache.stats.snapshot(), rec.accesses if rec else 0
        if stamps[-1] - t1 > a.time_limit:
            break
    after = engine.cache.stats.snapshot()
    if rec:
        rec.close()
    out = {"startup_s": startup, "ttft_s": stamps[0] - t1, "tokens": tokens, "n_decoded": len(tokens),
           "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None,
           "plan": engine.plan.summary(), "cache": after,
           "decode_hits": after["hits"] - before["hits"], "decode_misses": after["misses"] - before["misses"],
           "decode_bytes_read": after["bytes_read"] - before["bytes_read"]}
    if a.trace and len(tokens) > 1:
        sets = per_token_sets(a.trace, skip)
        out["distinct_per_token"] = sum(map(len, sets)) / len(sets)
        out["overlap_consecutive"] = sum(len(x & y) / len(y) for x, y in zip(sets, sets[1:])) / max(1, len(sets) - 1)
        out["distinct_total_decode"] = len(set().union(*sets))
    engine.close()
    return out


def child_llamacpp(a, prompt: list[int]) -> dict:
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    if a.system == "llamacpp-norepack":  # llama.cpp's --no-repack: weights stay in the mmap, not copied to RAM
        default = lib.llama_model_default_params

        def no_repack():
            p = default()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = no_repack

    t0 = time.perf_counter()
    llm = Llama(model_path=a.gguf, n_ctx=a.ctx, n_threads=a.threads, n_threads_batch=a.threads, verbose=False,
                n_batch=512, seed=SAMPLING["seed"])
    startup = time.perf_counter() - t0
    stamps, tokens = [], []
    t1 = time.perf_counter()
    for tok in llm.generate(prompt, top_k=SAMPLING["top_k"], top_p=1.0, min_p=0.0, temp=SAMPLING["temperature"],
                            repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        tokens.append(int(tok))
        if len(tokens) >= a.decode or stamps[-1] - t1 > a.time_limit:
            break
    return {"startup_s": startup, "ttft_s": stamps[0] - t1 if stamps else None, "tokens": tokens,
            "n_decoded": len(tokens),
            "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None}


def child(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("system")
    ap.add_argument("--gguf")
    ap.add_argument("--prompt")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--ctx", type=int)
    ap.add_argument("--decode", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--pregate", action="store_true")
    a = ap.parse_args(argv)
    with open(a.prompt) as f:
        prompt = json.load(f)
    out = (child_moepage if a.system == "moepage" else child_llamacpp)(a, prompt)
    import resource

    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")


# ---- parent ----------------------------------------------------------------------------------------------
def read_rate(path: str, seconds: float = 4.0, threads: int = 2, each: int = 3 << 20) -> float:
    """Bytes/s of O_DIRECT preads of `each`-byte slices at random offsets of the file, `threads` at once, page
    cache dropped first: what a page-in of one expert can get from this disk."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    caps.drop_caches()
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    rng = random.Random(0)
    stop = time.perf_counter() + seconds

    def worker(_):
        buf = mmap.mmap(-1, each)
        n = 0
        while time.perf_counter() < stop:
            off = rng.randrange(0, size - each) & ~4095
            n += os.preadv(fd, [buf], off)
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        total = sum(ex.map(worker, range(threads)))
    rate = total / (time.perf_counter() - t0)
    os.close(fd)
    return rate


def run_child(a, system: str, prompt_file: str, cap: int | None, decode: int, ctx: int, trace: str | None,
              time_limit: float, timeout: float | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", system, "--gguf", a.gguf, "--prompt", prompt_file,
           "--ctx", str(ctx), "--decode", str(decode), "--threads", str(a.threads), "--time-limit", str(time_limit)]
    if system == "moepage":
        cmd += ["--io-threads", str(a.io_threads)] + (["--pregate"] if a.pregate else [])
        if cap:
            cmd += ["--budget", str(cap - a.overhead)]
        if trace:
            cmd += ["--trace", trace]
    cg = caps.make_cgroup(f"moepage-fullsize-{cap // GiB if cap else 0}", cap) if cap else None

    def enter():
        if cg:
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    caps.drop_caches()
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter,
                           timeout=timeout or time_limit * 2 + 900)
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {time.time() - t0:.0f} s", "wall_s": time.time() - t0}
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        killed = p.returncode in (-9, 137)
        return {"system": system, "error": f"exit {p.returncode}" + (" (killed: out of memory)" if killed else ""),
                "stderr": p.stderr[-800:], "wall_s": time.time() - t0}
    out = {"system": system, **json.loads(line[len("RESULT "):]), "wall_s": time.time() - t0}
    if cg:
        with open(os.path.join(cg, "memory.max_usage_in_bytes")) as f:
            out["cgroup_peak_bytes"] = int(f.read())
        with open(os.path.join(cg, "memory.failcnt")) as f:
            out["cgroup_failcnt"] = int(f.read())
    return out


def serve_startup(a, cap: int | None, budget: int, port: int = 8765) -> dict:
    """Seconds from starting `moepage serve FILE --memory-budget B` (inside a cgroup of `cap` bytes, or none) to its
    first 200 from /health, and the cgroup's peak memory by then."""
    import urllib.request

    cmd = [sys.executable, "-m", "moepage.cli", "serve", a.gguf, "--port", str(port), "--memory-budget", str(budget),
           "--log-level", "warning"]
    cg = caps.make_cgroup(f"moepage-fullsize-serve-{cap // GiB if cap else 0}", cap) if cap else None

    def enter():
        if cg:
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    caps.drop_caches()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=enter)
    out = {"kind": "serve_startup", "cap_gib": cap / GiB if cap else None, "budget": budget}
    try:
        while time.perf_counter() - t0 < 600:
            if p.poll() is not None:
                out["error"] = f"exit {p.returncode}: {p.stderr.read()[-400:]}"
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        out["startup_s"] = time.perf_counter() - t0
                        break
            except OSError:
                time.sleep(0.1)
    finally:
        p.terminate()
        p.wait(30)
    if cg:
        with open(os.path.join(cg, "memory.max_usage_in_bytes")) as f:
            out["cgroup_peak_bytes"] = int(f.read())
    return out


def summarize(r: dict, rate: float) -> dict:
    if r.get("decode_tps") and r.get("n_decoded", 0) > 1 and "decode_bytes_read" in r:
        per_token = r["decode_bytes_read"] / (r["n_decoded"] - 1)
        r["bytes_missed_per_token"] = per_token
        r["disk_ceiling_tps"] = rate / per_token if per_token else None
        total = r["decode_hits"] + r["decode_misses"]
        r["decode_hit_rate"] = r["decode_hits"] / total if total else None
    return r


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--combine":  # --combine OUT_DIR A.json B.json ...: one table + PNG
        out, parts = sys.argv[2], [json.load(open(p)) for p in sys.argv[3:]]
        result = {**parts[0], "rows": [r for p in parts for r in p["rows"]],
                  "read_rate": {k: v for p in parts for k, v in p.get("read_rate", {}).items()}}
        with open(os.path.join(out, "fullsize.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(table(result))
        plot(result, os.path.join(out, "fullsize.png"))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-startup":  # --serve-startup FILE OUT.json [CAP_GIB ...]
        a = argparse.Namespace(gguf=sys.argv[2])
        rows = []
        for c in sys.argv[4:] or ["0", "8"]:
            cap = int(float(c) * GiB) if float(c) else None
            budget = (cap - (700 << 20)) if cap else 12 * GiB
            rows.append(serve_startup(a, cap, budget))
            print(rows[-1], file=sys.stderr)
        with open(sys.argv[3], "w") as f:
            json.dump(rows, f, indent=1)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--caps", default="12,8,6", help="cgroup memory caps in GiB")
    ap.add_argument("--routings", default="uniform,skewed")
    ap.add_argument("--systems", default="moepage,llamacpp")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--ttft-cap", type=float, default=8, help="GiB cap of the TTFT rows (0: none)")
    ap.add_argument("--ttft-tokens", type=int, default=2048)
    ap.add_argument("--ttft-timeout", type=float, default=900, help="seconds a TTFT row may take in all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--io-threads", type=int, default=4, help="moepage page-in threads (and the read-rate probe's)")
    ap.add_argument("--no-pregate", dest="pregate", action="store_false",
                    help="moepage without pre-gating (reading the next layer's guessed experts during this one)")
    ap.add_argument("--overhead", type=int, default=700 << 20,
                    help="bytes of a cap left for the moepage process itself (python, torch, ggml, allocator slack)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds of moepage decoding per row at most")
    ap.add_argument("--llama-time", type=float, default=120.0, help="seconds of llama.cpp decoding per row at most")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fullsize"))
    a = ap.parse_args()
    if not caps.can_cap():
        sys.exit("needs root and the cgroup v1 memory controller at " + caps.CGROOT)
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(1)
    files = {}
    for name, n in (("short", a.prompt_tokens), ("long", a.ttft_tokens)):
        files[name] = os.path.join(a.out, f"prompt-{name}.json")
        with open(files[name], "w") as f:
            json.dump([rng.randrange(0, 150000) for _ in range(n)], f)
    systems = a.systems.split(",")
    result = {"gguf": os.path.abspath(a.gguf), "bytes": os.path.getsize(a.gguf), "sampling": SAMPLING,
              "io_threads": a.io_threads, "pregate": a.pregate, "ttft_tokens": a.ttft_tokens,
              "decode": a.decode, "prompt_tokens": a.prompt_tokens, "overhead": a.overhead, "rows": []}
    partial = os.path.join(a.out, "fullsize.partial.json")
    for routing in a.routings.split(",") if a.caps else []:
        synthetic_gguf.patch_routing(a.gguf, synthetic_gguf.Routing(routing))
        rate = read_rate(a.gguf, threads=a.io_threads)
        result.setdefault("read_rate", {})[routing] = rate
        print(f"[{routing}] O_DIRECT read rate, 3 MiB slices x {a.io_threads}: {rate / 1e9:.2f} GB/s", file=sys.stderr)
        for cap_gib in [float(c) for c in a.caps.split(",") if c]:
            cap = int(cap_gib * GiB)
            for system in systems:
                trace = os.path.join(a.out, f"trace-{routing}-{cap_gib:g}.jsonl") if system == "moepage" else None
                limit = a.time_limit if system == "moepage" else a.llama_time
                print(f"[{routing}] {system} at {cap_gib:g} GiB ...", file=sys.stderr, flush=True)
                r = run_child(a, system, files["short"], cap, a.decode, a.prompt_tokens + a.decode + 64, trace, limit)
                r.update(routing=routing, cap_gib=cap_gib, kind="decode")
                result["rows"].append(summarize(r, rate))
                print("   ", {k: r.get(k) for k in ("decode_tps", "n_decoded", "startup_s", "cgroup_peak_bytes",
                                                     "decode_hit_rate", "disk_ceiling_tps", "distinct_per_token",
                                                     "overlap_consecutive", "error")}, file=sys.stderr, flush=True)
                with open(partial, "w") as f:
                    json.dump(result, f, indent=1)
    if a.ttft_cap:  # last: one long prefill per system, on the first routing
        routing = a.routings.split(",")[0]
        synthetic_gguf.patch_routing(a.gguf, synthetic_gguf.Routing(routing))
        cap = int(a.ttft_cap * GiB)
        for system in systems:
            if any(r["system"] == system and r["cap_gib"] <= a.ttft_cap and "out of memory" in (r.get("error") or "")
                   for r in result["rows"]):
                continue  # killed for memory at this cap already: a longer prompt needs more
            print(f"[{routing}] {system} TTFT, {a.ttft_tokens} tokens at {a.ttft_cap:g} GiB ...", file=sys.stderr)
            r = run_child(a, system, files["long"], cap, 2, a.ttft_tokens + 64, None, a.llama_time, a.ttft_timeout)
            r.update(routing=routing, cap_gib=a.ttft_cap, kind="ttft")
            result["rows"].append(r)
            print("   ", {k: r.get(k) for k in ("ttft_s", "cgroup_peak_bytes", "error")}, file=sys.stderr)
            with open(partial, "w") as f:
                json.dump(result, f, indent=1)
    with open(os.path.join(a.out, "fullsize.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    plot(result, os.path.join(a.out, "fullsize.png"))


def table(result: dict) -> str:
    """The README table: one line per (routing, cap); llama.cpp as run by default and with --no-repack."""
    rows = [r for r in result["rows"] if r["kind"] == "decode"]
    f = lambda v, spec=".2f": format(v, spec) if isinstance(v, (int, float)) else "-"  # noqa: E731
    gb = lambda v: f"{v / GiB:.2f}" if v else "-"  # noqa: E731

    def tps(r):
        if not r:
            return "-"
        if r.get("error"):
            return "OOM-killed" if "out of memory" in r["error"] else r["error"]
        return f"{f(r.get('decode_tps'))} ({r.get('n_decoded', 0)} tok)"

    lines = ["| routing | cap GiB | moepage tok/s | llama.cpp tok/s | llama.cpp --no-repack tok/s | moepage / llama.cpp "
             "| disk ceiling tok/s | hit rate (prefetched incl.) | distinct experts in decode (of all) "
             "| overlap with previous token | MiB read/token "
             "| peak GiB moepage / llama.cpp nr | start-up s moepage / llama.cpp nr |", "|" + "---|" * 13]
    for routing in dict.fromkeys(r["routing"] for r in rows):
        for cap in dict.fromkeys(r["cap_gib"] for r in rows):
            pick = lambda s: next((r for r in rows if r["routing"] == routing and r["cap_gib"] == cap  # noqa: E731
                                   and r["system"] == s), {})
            m, l, n = pick("moepage"), pick("llamacpp"), pick("llamacpp-norepack")
            if not (m or l or n):
                continue
            best = max((x.get("decode_tps") or 0 for x in (l, n)), default=0)
            ratio = f"{m['decode_tps'] / best:.1f}x" if m.get("decode_tps") and best else "-"
            lines.append(
                f"| {routing} | {cap:g} | {tps(m)} | {tps(l)} | {tps(n)} | {ratio} | {f(m.get('disk_ceiling_tps'))} "
                f"| {f(m.get('decode_hit_rate'), '.1%')} | {f(m.get('distinct_total_decode'), '.0f')} "
                f"| {f(m.get('overlap_consecutive'), '.0%')} | {f((m.get('bytes_missed_per_token') or 0) / 2**20, '.0f')} "
                f"| {gb(m.get('cgroup_peak_bytes'))} / {gb(n.get('cgroup_peak_bytes'))} "
                f"| {f(m.get('startup_s'), '.1f')} / {f(n.get('startup_s'), '.1f')} |")
    for r in result["rows"]:
        if r["kind"] == "ttft":
            lines.append(f"TTFT, {result.get('ttft_tokens')}-token prompt, {r['system']} at {r['cap_gib']:g} GiB: "
                         + (f"{r['ttft_s']:.1f} s" if r.get("ttft_s") else str(r.get("error"))))
    return "\n".join(lines)


def plot(result: dict, path: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
        return
    rows = [r for r in result["rows"] if r["kind"] == "decode"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for (system, routing), style in {("moepage", "uniform"): "o-", ("moepage", "skewed"): "o--",
                                     ("llamacpp-norepack", "uniform"): "s-", ("llamacpp-norepack", "skewed"): "s--",
                                     ("llamacpp", "uniform"): "x-", ("llamacpp", "skewed"): "x--"}.items():
        pts = sorted((r["cap_gib"], r.get("decode_tps") or 0) for r in rows
                     if r["system"] == system and r["routing"] == routing)
        if pts:
            ax.plot(*zip(*pts), style, label=f"{system} ({routing})")
    ceil = sorted((r["cap_gib"], r["disk_ceiling_tps"]) for r in rows if r.get("disk_ceiling_tps")
                  and r["routing"] == "uniform")
    if ceil:
        ax.plot(*zip(*ceil), "k:", label="disk ceiling (uniform)")
    ax.set_xlabel("cgroup memory cap (GiB)")
    ax.set_ylabel("decode tok/s")
    ax.set_yscale("log")
    ax.set_title(f"Qwen3-30B-A3B shape, Q4_K_M, {result['bytes'] / 1e9:.1f} GB file, 2 threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
