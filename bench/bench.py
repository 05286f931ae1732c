"""moepage vs llama.cpp vs transformers, in one run, on one model: resident and under cgroup memory caps.

    python bench/bench.py --model /tmp/benchmodel --gguf /tmp/benchmodel.gguf [--caps 1,0.7,0.5,0.3]

Prints one table of ratios (moepage / peer), writes bench/out/bench.json and bench/out/bench.png.
Capped rows need root (cgroup v1 memory controller + drop_caches); they are skipped otherwise.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CGROOT = "/sys/fs/cgroup/memory"


def model_bytes(model_dir: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(model_dir, "*.safetensors")))


def can_cap() -> bool:
    return os.geteuid() == 0 and os.path.isdir(CGROOT)


def drop_caches():
    subprocess.run(["sync"], check=False)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def make_cgroup(name: str, limit: int) -> str:
    path = os.path.join(CGROOT, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
        f.write(str(limit))
    try:
        with open(os.path.join(path, "memory.max_usage_in_bytes"), "w") as f:
            f.write("0")
    except OSError:
        pass
    return path


def run(system: str, a, prompt_file: str, cgroup: str | None, extra: list[str], model: str | None = None) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "run_one.py"), system, "--model", model or a.model, "--prompt-ids", prompt_file,
           "--decode", str(a.decode), "--threads", str(a.threads), "--time-limit", str(a.time_limit),
           "--ctx", str(a.prompt_tokens + a.decode + 64)]
    if a.gguf:
        cmd += ["--gguf", a.gguf]
    cmd += extra

    def enter():
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    if cgroup:
        drop_caches()
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter, timeout=a.time_limit * 3 + 300)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"system": system, "error": f"exit {p.returncode}" + (" (killed: out of memory)" if p.returncode in (-9, 137) else ""),
                "stderr": p.stderr[-600:], "wall_s": time.time() - t0}
    out = json.loads(line[len("RESULT "):])
    if cgroup:
        with open(os.path.join(cgroup, "memory.max_usage_in_bytes")) as f:
            out["cgroup_peak_bytes"] = int(f.read())
    return out


def raw_pread_p50(model_dir: str, samples: int = 64, concurrency: int = 1) -> dict:
    """p50 seconds to read one expert's bytes (its three tensors' span) with a bare os.preadv, page cache dropped:
    with O_DIRECT into an aligned buffer (what moepage does) and buffered (what a plain pread does), `concurrency`
    reads in flight at once (moepage's page-ins share the disk with its other read threads the same way)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, os.path.dirname(HERE))
    from moepage.engine.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir, drop_page_cache=True)
    a = ckpt.args
    rng = random.Random(0)
    picks = [(rng.choice(a.moe_layers), rng.randrange(a.num_experts)) for _ in range(samples)]
    out = {}
    for mode in ("direct", "buffered"):
        if can_cap():
            drop_caches()

        def one(pick):
            layer, e = pick
            by_file: dict = {}
            for n in ckpt.experts.names(layer, e).values():
                f = ckpt.experts.index.file_of(n, "expert")
                lo, hi = by_file.get(f.path, (f.tensors[n].start, f.tensors[n].end))
                by_file[f.path] = (min(lo, f.tensors[n].start), max(hi, f.tensors[n].end))
            spent = 0.0
            for path, (start, end) in by_file.items():
                if mode == "direct":
                    lo, hi = start - start % 4096, -(-end // 4096) * 4096
                    fd, buf, at = os.open(path, os.O_RDONLY | os.O_DIRECT), mmap.mmap(-1, hi - lo), lo
                else:
                    fd, buf, at = os.open(path, os.O_RDONLY), bytearray(end - start), start
                t0 = time.perf_counter()
                os.preadv(fd, [buf], at)
                spent += time.perf_counter() - t0
                os.close(fd)
            return spent

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            times = sorted(pool.map(one, picks))
        out[mode] = times[len(times) // 2]
        out[mode + "_bytes_per_s"] = sum(ckpt.experts.stored_nbytes(layer) for layer, _ in picks) / (
            time.perf_counter() - t0)
    out["token_expert_bytes"] = token_expert_bytes(model_dir)
    return out


def prompt_ids(model_dir: str, n: int) -> list[int]:
    from moepage.commands.bench import prompt_from_corpus
    from moepage.engine.tokenizer import Tokenizer

    return prompt_from_corpus(Tokenizer.from_dir(model_dir), n)


def cap_label(cap, row) -> str:
    return "none" if cap >= 1 else f"{cap:.0%} ({row['limit_bytes'] / 2**30:.2f} GiB)"


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf", default=None, help="the same model as GGUF (bf16) for llama.cpp")
    ap.add_argument("--caps", default="1,0.7,0.5,0.3", help="memory caps as fractions of the model's bytes (1 = none)")
    ap.add_argument("--systems", default="moepage,llamacpp,transformers")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=90.0, help="seconds of decoding per run at most")
    ap.add_argument("--cap-base", type=int, default=0,
                    help="bytes added to every cap (a process baseline, so both systems can start at low caps)")
    ap.add_argument("--overhead", type=int, default=330 << 20,
                    help="bytes of a cap left for the moepage process itself (python, torch, tokenizer, kernels)")
    ap.add_argument("--io-threads", type=int, default=2, help="moepage expert read threads")
    ap.add_argument("--repeats", type=int, default=3,
                    help="uncapped runs of moepage and llama.cpp, interleaved; the table gives each one's median "
                         "(memory bandwidth on shared machines moves by 20%% between minutes)")
    ap.add_argument("--lossless", action="store_true",
                    help="moepage reads a `moepage split --lossless` copy of --model (made once under --out): the same "
                         "bf16 weights in 12 bits each on disk; the lowest cap also runs moepage on the plain checkpoint")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    systems = a.systems.split(",")
    if "llamacpp" in systems and not a.gguf:
        sys.exit("--gguf is required for llamacpp")
    size = model_bytes(a.model)
    prompt_file = os.path.join(a.out, "prompt.json")
    with open(prompt_file, "w") as f:
        json.dump(prompt_ids(a.model, a.prompt_tokens), f)
    packed = lossless_copy(a) if a.lossless and "moepage" in systems else None
    rows = []
    for cap in [float(c) for c in a.caps.split(",")]:
        limit = None if cap >= 1 else int(cap * size) + a.cap_base
        if limit and not can_cap():
            print(f"skipping the {cap:.0%} cap: needs root and cgroup v1 memory at {CGROOT}", file=sys.stderr)
            continue
        cg = make_cgroup(f"moepage-bench-{int(cap * 100)}", limit) if limit else None
        lowest = cap == min(float(c) for c in a.caps.split(","))
        # uncapped and lowest-cap runs repeat (disk and memory bandwidth both drift by 15-30% between minutes here)
        for rep, system in [(rep, s) for rep in range(a.repeats if not limit or lowest else 1) for s in systems]:
            if system == "transformers" and (limit or rep):
                continue  # transformers loads every weight; it does not run under a cap below the model size
            extra = []
            if system == "moepage":
                extra = ["--io-threads", str(a.io_threads)]
                if limit:
                    extra += ["--memory-budget", str(limit - a.overhead)]
            variants = [("", extra)]
            if system == "moepage" and limit and lowest and rep == 0:
                variants[0] = ("", extra + ["--trace", os.path.join(a.out, "trace.jsonl")])
                variants.append((" (+ pre-gating)", extra + ["--pregate"]))
                variants.append((" (prefetch off)", extra + ["--no-prefetch"]))
                if packed:
                    variants.append((" (bf16 shards)", extra))
            for suffix, ex in variants:
                print(f"running {system}{suffix} at cap {cap:.0%} ...", file=sys.stderr, flush=True)
                model = packed if system == "moepage" and packed and suffix != " (bf16 shards)" else None
                r = run(system, a, prompt_file, cg, ex + (["--no-verify"] if model else []), model)
                r.update(cap=cap, limit_bytes=limit, label=system + suffix, repeat=rep)
                rows.append(r)
                with open(os.path.join(a.out, "rows.partial.json"), "w") as f:
                    json.dump(rows, f, indent=1)
                print("  ", {k: r.get(k) for k in ("decode_tps", "prefill_tps", "ttft_s", "n_decoded", "error")},
                      file=sys.stderr, flush=True)
    pread_p50 = {"qd1": raw_pread_p50(a.model), "same_qd": raw_pread_p50(a.model, concurrency=a.io_threads)}
    if packed:
        pread_p50["lossless_token_expert_bytes"] = token_expert_bytes(packed)
    report(median_of_repeats(rows), pread_p50, size, a)


def lossless_copy(a) -> str:
    """`moepage split --lossless` of --model under --out (kept between runs: it only depends on the model)."""
    path = os.path.join(a.out, "lossless-" + os.path.basename(os.path.normpath(a.model)))
    if not os.path.exists(os.path.join(path, "moepage.json")):
        print(f"writing the lossless 12-bit copy of {a.model} to {path} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "moepage.cli", "split", a.model, path, "--lossless"], check=True)
    # every shard's sha256 checked once here, so the timed runs skip the check at first page-in (--no-verify)
    subprocess.run([sys.executable, "-m", "moepage.cli", "verify", path], check=True)
    return path


def token_expert_bytes(model_dir: str) -> int:
    """Bytes one token's routed experts occupy on disk (top-k experts in every sparse layer)."""
    sys.path.insert(0, os.path.dirname(HERE))
    from moepage.engine.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir, verify=False)
    return ckpt.args.top_k * sum(ckpt.experts.stored_nbytes(layer) for layer in ckpt.args.moe_layers)


def median_of_repeats(rows: list[dict]) -> list[dict]:
    """One row per (system, cap): the run with the median decode tok/s, carrying every run's decode tok/s."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["label"], r["cap"]), []).append(r)
    out = []
    for runs in groups.values():
        ok = sorted((r for r in runs if r.get("decode_tps")), key=lambda r: r["decode_tps"])
        pick = dict(ok[(len(ok) - 1) // 2] if ok else runs[0])
        pick["decode_tps_runs"] = [r.get("decode_tps") for r in runs]
        out.append(pick)
    return out


def policy_replays(a, low) -> list[str]:
    """Every eviction policy replayed on the trace of the lowest cap's run, at that run's expert-cache size."""
    from moepage.paging.trace import load_trace, replay

    path = os.path.join(a.out, "trace.jsonl")
    if not os.path.exists(path) or not low or not low.get("cache_capacity_experts"):
        return []
    keys = load_trace(path)
    cap = low["cache_capacity_experts"]
    results = [replay(keys, p, cap) for p in ("lru", "lfu", "stale")]
    return ["", f"eviction policies replayed on that run's routing trace ({len(keys)} expert accesses, cache of {cap} "
            "experts): " + ", ".join(f"{r.policy} {r.hit_rate:.1%}" for r in results) + " hit rate"]


def report(rows, pread_p50, size, a):
    def get(label, cap):
        return next((r for r in rows if r["label"] == label and r["cap"] == cap), None)

    caps = sorted({r["cap"] for r in rows}, reverse=True)
    ref = get("moepage", 1.0)
    lines = [f"model {a.model}: {size / 2**30:.2f} GiB, prompt {a.prompt_tokens} tokens, decode {a.decode}, "
             f"{a.threads} threads", "",
             "| cap | system | decode tok/s | prefill tok/s | TTFT s | peak RSS MiB | moepage/peer decode | same tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for cap in caps:
        me = get("moepage", cap)
        for r in [r for r in rows if r["cap"] == cap]:
            ratio = None
            if r["label"] != "moepage" and me and me.get("decode_tps") and r.get("decode_tps"):
                ratio = me["decode_tps"] / r["decode_tps"]
            same = ""
            if r["label"].startswith("moepage") and ref and r.get("tokens"):
                n = min(len(ref["tokens"]), len(r["tokens"]))
                same = "yes" if r["tokens"][:n] == ref["tokens"][:n] else "NO"
            rss = r.get("peak_rss_bytes")
            lines.append(
                f"| {cap_label(cap, r)} | {r['label']} | "
                f"{fmt(r.get('decode_tps'))} | {fmt(r.get('prefill_tps'), '.1f')} | {fmt(r.get('ttft_s'))} | "
                f"{fmt(rss / 2**20 if rss else None, '.0f')} | {fmt(ratio) + 'x' if ratio else '-'} | {same}"
                + (f" {r['error']}" if r.get("error") else "") + " |")
    repeated = [r for r in rows if len(r.get("decode_tps_runs", [])) > 1]
    if repeated:
        lines += ["", "decode tok/s of every repeated run, in the order run (moepage and llama.cpp alternating; the "
                  "table gives the median): " + "; ".join(
                      f"{r['label']} at {cap_label(r['cap'], r)} " + ", ".join(fmt(x) for x in r["decode_tps_runs"])
                      for r in repeated)]
        for cap in sorted({r["cap"] for r in repeated}, reverse=True):
            mine, peer = get("moepage", cap), get("llamacpp", cap)
            if mine and peer and len(mine["decode_tps_runs"]) == len(peer["decode_tps_runs"]) > 1:
                pairs = [m / p for m, p in zip(mine["decode_tps_runs"], peer["decode_tps_runs"]) if m and p]
                lines.append(f"moepage/llama.cpp run by run at {cap_label(cap, mine)}: "
                             + ", ".join(f"{x:.2f}x" for x in pairs))
    low = get("moepage", min(caps)) if caps else None
    if low and low.get("cache"):
        # page-in against a bare read of the same bytes: the run that reads the checkpoint's own bf16 bytes
        plain = get("moepage (bf16 shards)", min(caps))
        c = (plain or low)["cache"]
        raw, qd1 = pread_p50["same_qd"]["direct"], pread_p50["qd1"]["direct"]
        lines += ["", f"at the {min(caps):.0%} cap{' (bf16 shards run)' if plain else ''}: expert cache hit rate {c['hit_rate']:.1%}; page-in p50 "
                  f"{c['page_in_p50_s'] * 1e3:.2f} ms (p99 {c['page_in_p99_s'] * 1e3:.2f} ms) vs a bare O_DIRECT pread of "
                  f"the same bytes with {a.io_threads} reads in flight (moepage's read threads) {raw * 1e3:.2f} ms = "
                  f"{c['page_in_p50_s'] / raw:.2f}x; one read alone {qd1 * 1e3:.2f} ms = {c['page_in_p50_s'] / qd1:.2f}x "
                  f"(buffered pread {pread_p50['qd1']['buffered'] * 1e3:.2f} ms); prefetch issued "
                  f"{c['prefetch_issued']}, used {c['prefetch_used']} "
                  f"({c['prefetch_used'] / max(1, c['prefetch_issued']):.1%})"]
        rate, per_token = pread_p50["same_qd"]["direct_bytes_per_s"], pread_p50["same_qd"]["token_expert_bytes"]
        if per_token:
            lines.append(f"disk: {rate / 1e9:.2f} GB/s for expert reads with {a.io_threads} in flight; one token's routed "
                         f"experts ({per_token / 1e6:.0f} MB) read from disk take {per_token / rate * 1e3:.0f} ms: at most "
                         f"{rate / per_token:.2f} tok/s at a cap whose cache misses every expert")
        packed_bytes = pread_p50.get("lossless_token_expert_bytes")
        if packed_bytes:
            lines.append(f"lossless 12-bit shards (moepage rows): {packed_bytes / 1e6:.0f} MB a token "
                         f"({packed_bytes / per_token:.1%} of bf16): at most {rate / packed_bytes:.2f} tok/s at that rate")
        if plain and plain.get("decode_tps") and low.get("decode_tps"):
            lines.append(f"lossless shards vs the bf16 checkpoint at {min(caps):.0%}: {low['decode_tps']:.2f} vs "
                         f"{plain['decode_tps']:.2f} tok/s = {low['decode_tps'] / plain['decode_tps']:.2f}x")
        pg = get("moepage (+ pre-gating)", min(caps))
        if pg and pg.get("cache"):
            c = pg["cache"]
            lines.append(f"pre-gating at {min(caps):.0%}: {pg['decode_tps'] or 0:.2f} tok/s, guesses precision "
                         f"{c['guess_precision']:.1%}, recall {c['guess_recall']:.1%}")
        off = get("moepage (prefetch off)", min(caps))
        if off and off.get("decode_tps") and low.get("decode_tps"):
            lines.append(f"prefetch on/off at {min(caps):.0%}: {low['decode_tps'] / off['decode_tps']:.2f}x decode "
                         f"({low['decode_tps']:.2f} vs {off['decode_tps']:.2f} tok/s)")
        lines += policy_replays(a, low)
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump({"rows": rows, "raw_pread_p50_s": pread_p50, "model_bytes": size, "table": text,
                   "command": " ".join(sys.argv)}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label in sorted({r["label"] for r in rows}):
            pts = sorted((r["cap"], r["decode_tps"]) for r in rows if r["label"] == label and r.get("decode_tps"))
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("memory cap, % of model bytes (100 = no cap)")
        ax.set_ylabel("decode tokens/s")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "bench.png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)


if __name__ == "__main__":
    main()
