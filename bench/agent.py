"""Agent-serving benches, in one run on one model: concurrent streams, long-prompt time to first token against
llama.cpp, and a 3-turn conversation's prompt re-use, resident and under cgroup memory caps.

    python bench/agent.py --model DIR --gguf DIR.gguf [--caps 1,0.5,0.3] [--out bench/results]   # as root for caps

streams  aggregate decode tok/s of --streams concurrent streaming requests against one alone, over HTTP to
         moepage's server (--parallel = --streams), resident and at the lowest cap; the concurrent greedy tokens
         are checked against the ones the requests get alone.
ttft     time to first token of --prompts token prompts (default 2048 and 10240), moepage and llama.cpp
         (llama-cpp-python, the same weights as a bf16 GGUF, n_batch 512), each in its own process (bench/run_one.py),
         at every cap.
turns    a 3-turn chat with a title request between turns (as OpenCode sends them) over HTTP, the system prompt
         --system-tokens long: usage.prompt_tokens_details.cached_tokens against the previous turn's prompt, and
         each turn's time to first token.
Under a cap (fraction x the model's bytes + --cap-base) moepage gets --memory-budget = cap - --overhead; the default
overhead is the process baseline measured first (torch, the server app, the openai client and the model's tokenizer:
a 152k-token vocabulary's tokenizer alone is ~100 MiB) plus 64 MiB, since the budget counts the model's bytes only.
Writes OUT/agent.json and prints the table (ratios and medians are computed here, from this run).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench as core  # noqa: E402  (bench/bench.py: cgroups, run_one, prompts)


# ---- children (run inside a cgroup) ------------------------------------------------------------------------------
def _serve(a, parallel: int, ctx: int):
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.server.app import create_app
    from moepage.server.runner import BackgroundServer
    from moepage.server.settings import ServerSettings

    engine = Engine.load(EngineConfig(model=a.model, memory_budget=a.memory_budget, ctx_size=ctx,
                                      threads=a.threads, parallel=parallel, prefix_cache=True))
    server = BackgroundServer(create_app(engine, ServerSettings(model_id="bench", log_requests=False)))
    return engine, server, server.start()


def _stream(url: str, prompt: list[int], n: int) -> dict:
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}
    t0, stamps, tokens = time.perf_counter(), [], []
    with httpx.Client(timeout=600) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                lp = choice.get("logprobs") or {}
                for tok in lp.get("tokens") or []:
                    stamps.append(time.perf_counter())
                    tokens.append(tok)
    return {"t0": t0, "stamps": stamps, "tokens": tokens}


def child_streams(a):
    engine, server, url = _serve(a, a.streams, 32 + a.decode + 64)  # a KV cache per stream: as long as they need
    rng = random.Random(0)
    vocab = min(engine.args.vocab_size, 150_000)
    prompts = [[rng.randrange(vocab) for _ in range(32)] for _ in range(a.streams)]
    try:
        _stream(url, prompts[0][:8], 4)  # warm-up
        alone = [_stream(url, p, a.decode) for p in prompts]
        one_tps = statistics.median((len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in alone)
        results = [None] * a.streams

        def go(i):
            results[i] = _stream(url, prompts[i], a.decode)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(a.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = max(r["stamps"][0] for r in results)  # from when all are decoding
        last = min(r["stamps"][-1] for r in results)  # until the first one ends
        during = sum(sum(first <= s <= last for s in r["stamps"]) for r in results)
        out = {"streams": a.streams, "one_stream_tps": one_tps, "aggregate_tps": during / (last - first) if last > first else None,
               "same_tokens": [r["tokens"] for r in results] == [r["tokens"] for r in alone],
               "cache": engine.cache.stats.snapshot(), "plan": engine.plan.summary()}
    finally:
        server.stop()
        engine.close()
    print("RESULT " + json.dumps(out), flush=True)


WORDS = ("read", "file", "path", "write", "edit", "search", "the", "tool", "returns", "lines", "of", "a", "shell",
         "command", "run", "grep", "pattern", "directory", "list", "json", "argument", "string", "must", "be", "when")


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its peak so far (VmHWM), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    return 0


def child_turns(a):
    import openai
    import torch  # noqa: F401  (the process baseline: what the server imports before it loads a model)

    import moepage.server.app  # noqa: F401

    baseline = rss_bytes()
    engine, server, url = _serve(a, 2, a.ctx)  # two slots: the agent turn and the title request
    loaded = rss_bytes()
    rng = random.Random(0)
    system = "You are a coding agent. Tools:\n" + " ".join(rng.choice(WORDS) for _ in range(a.system_tokens))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "List the files in src."}]
    turns = []
    try:
        for turn in range(3):
            t0 = time.perf_counter()
            r = client.chat.completions.create(model="bench", messages=messages, max_tokens=1, temperature=0)
            turns.append({"ttft_s": time.perf_counter() - t0, "prompt_tokens": r.usage.prompt_tokens,
                          "cached_tokens": r.usage.prompt_tokens_details.cached_tokens})
            client.chat.completions.create(model="bench", max_tokens=4, temperature=0, messages=[
                {"role": "system", "content": "Write a short title for the conversation."},
                {"role": "user", "content": messages[1]["content"]}])
            messages += [{"role": "assistant", "content": r.choices[0].message.content or "ok"},
                         {"role": "user", "content": f"Now open file number {turn}."}]
    finally:
        server.stop()
        engine.close()
    print("RESULT " + json.dumps({"turns": turns, "baseline_rss_bytes": baseline, "loaded_rss_bytes": loaded,
                                  "peak_rss_bytes": rss_bytes("VmHWM"), "plan": engine.plan.summary()}), flush=True)


def child_baseline(a):
    """What a server process holds before any weight: torch, the app, the openai client, the model's tokenizer."""
    import openai  # noqa: F401
    import torch  # noqa: F401

    import moepage.server.app  # noqa: F401
    from moepage.engine.checkpoint import open_checkpoint

    before = rss_bytes()
    tokenizer = open_checkpoint(a.model).load_tokenizer()
    print("RESULT " + json.dumps({"imports_rss_bytes": before, "baseline_rss_bytes": rss_bytes(),
                                  "vocab": tokenizer.vocab_size}), flush=True)


# ---- the parent --------------------------------------------------------------------------------------------------
def run_child(kind: str, a, cgroup: str | None, budget: int | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--model", a.model, "--threads", str(a.threads),
           "--streams", str(a.streams), "--decode", str(a.decode), "--system-tokens", str(a.system_tokens),
           "--ctx", str(a.ctx)] + (["--memory-budget", str(budget)] if budget else [])

    def enter():
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    if cgroup:
        core.drop_caches()
        with open(os.path.join(cgroup, "memory.max_usage_in_bytes"), "w") as f:
            f.write("0")  # this child's peak, not an earlier one's
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter, timeout=a.time_limit * 6 + 600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    out = {"error": f"exit {p.returncode}" + (" (killed: out of memory)" if p.returncode in (-9, 137) else ""),
           "stderr": p.stderr[-800:]} if line is None else json.loads(line[len("RESULT "):])
    if cgroup:
        with open(os.path.join(cgroup, "memory.max_usage_in_bytes")) as f:
            out["cgroup_peak_bytes"] = int(f.read())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--caps", default="1,0.5,0.3")
    ap.add_argument("--parts", default="streams,ttft,turns")
    ap.add_argument("--prompts", default="2048,10240")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--system-tokens", type=int, default=8000, help="words in the turns bench's system prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=8192, help="the turns bench's context (2 slots of it)")
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--overhead", type=int, default=None, help="bytes of a cap left out of --memory-budget for the "
                    "process itself (default: its baseline, measured here: torch, the server, the tokenizer, + 64 MiB)")
    ap.add_argument("--cap-base", type=int, default=0, help="bytes added to every cap (fraction x model bytes + "
                    "this), so a cap holds the process baseline as well as the model's share")
    ap.add_argument("--memory-budget", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    if a.child:
        return {"streams": child_streams, "turns": child_turns, "baseline": child_baseline}[a.child](a)
    os.makedirs(a.out, exist_ok=True)
    size = core.model_bytes(a.model)
    caps = [float(c) for c in a.caps.split(",")]
    parts = a.parts.split(",")
    rows = []
    path = os.path.join(a.out, "agent.json")

    def save(row):
        rows.append(row)
        print("  ", json.dumps({k: v for k, v in row.items() if k not in ("tokens", "cache", "plan", "stderr")}),
              file=sys.stderr, flush=True)
        with open(path, "w") as f:
            json.dump({"model": a.model, "model_bytes": size, "rows": rows}, f, indent=1)

    if a.overhead is None and min(caps) < 1:
        base = run_child("baseline", a, None, None)
        if "baseline_rss_bytes" not in base:
            raise SystemExit(f"measuring the process baseline failed: {base}")
        a.overhead = base["baseline_rss_bytes"] + (64 << 20)  # + activations, allocator slack
        save({"part": "baseline", "cap": 1.0, **base, "overhead_bytes": a.overhead})
    for cap in caps:
        limit = None if cap >= 1 else int(cap * size) + a.cap_base
        if limit and not core.can_cap():
            print(f"skipping the {cap:.0%} cap: needs root and cgroup v1 memory", file=sys.stderr)
            continue
        cg = core.make_cgroup(f"moepage-agent-{int(cap * 100)}", limit) if limit else None
        budget = limit - a.overhead if limit else None
        if "streams" in parts and (cap >= 1 or cap == min(caps)):
            print(f"streams at cap {cap:.0%}", file=sys.stderr, flush=True)
            save({"part": "streams", "cap": cap, **run_child("streams", a, cg, budget)})
        if "ttft" in parts:
            for n in [int(x) for x in a.prompts.split(",")]:
                prompt_file = os.path.join(a.out, f"prompt-{n}.json")
                with open(prompt_file, "w") as f:
                    json.dump(core.prompt_ids(a.model, n), f)
                ns = argparse.Namespace(model=a.model, gguf=a.gguf, decode=2, threads=a.threads,
                                        time_limit=a.time_limit, prompt_tokens=n)
                for system in ["moepage", "llamacpp"] if a.gguf else ["moepage"]:
                    print(f"ttft {n} tokens, {system}, cap {cap:.0%}", file=sys.stderr, flush=True)
                    extra = ["--memory-budget", str(budget)] if system == "moepage" and budget else []
                    r = core.run(system, ns, prompt_file, cg, extra)
                    save({"part": "ttft", "cap": cap, "prompt": n, "system": system,
                          **{k: r.get(k) for k in ("ttft_s", "prefill_tps", "error", "cgroup_peak_bytes")}})
        if "turns" in parts and (cap >= 1 or cap == min(caps)):
            print(f"turns at cap {cap:.0%}", file=sys.stderr, flush=True)
            save({"part": "turns", "cap": cap, **run_child("turns", a, cg, budget)})
    report(rows)


def report(rows):
    print("\n| bench | cap | moepage | peer | ratio |\n|---|---|---|---|---|")
    for r in rows:
        if r.get("error"):
            print(f"| {r['part']} {r.get('prompt', '')} {r.get('system', '')} | {r['cap']:.0%} | error: {r['error']} | | |")
        elif r["part"] == "baseline":
            print(f"| process baseline (torch, server, openai, tokenizer; MiB) | | {r['baseline_rss_bytes'] / 2**20:.0f} | "
                  f"left out of each cap: {r['overhead_bytes'] / 2**20:.0f} | |")
        elif r["part"] == "streams":
            agg, one = r.get("aggregate_tps"), r.get("one_stream_tps")
            print(f"| decode, {r.get('streams')} streams together vs 1 alone (tok/s; same tokens: "
                  f"{r.get('same_tokens')}) | {r['cap']:.0%} | {agg:.1f} | {one:.1f} | {agg / one:.2f}x |")
        elif r["part"] == "turns":
            t = r["turns"]
            ttfts = ", ".join(f"{x['ttft_s']:.2f}" for x in t)
            reuse = f"{t[1]['cached_tokens'] / t[0]['prompt_tokens']:.0%}, {t[2]['cached_tokens'] / t[1]['prompt_tokens']:.0%}"
            mib = {k: f"{r[k] / 2**20:.0f}" for k in ("baseline_rss_bytes", "peak_rss_bytes", "cgroup_peak_bytes")
                   if r.get(k)}
            print(f"| 3 turns ({t[0]['prompt_tokens']} tokens): TTFT (s); cached / previous prompt | {r['cap']:.0%} | "
                  f"{ttfts} | {reuse} | turn 2 / turn 1: {t[1]['ttft_s'] / t[0]['ttft_s']:.3f} (MiB: {mib}) |")
    for r in rows:
        if r["part"] == "ttft" and r["system"] == "moepage" and r.get("ttft_s"):
            peer = next((p for p in rows if p["part"] == "ttft" and p["system"] == "llamacpp"
                         and p["cap"] == r["cap"] and p["prompt"] == r["prompt"]), None)
            pt = peer.get("ttft_s") if peer else None
            peer_cell = f"{pt:.2f}" if pt else (peer or {}).get("error")
            ratio = f"{pt / r['ttft_s']:.2f}x" if pt else ""
            print(f"| TTFT {r['prompt']} tokens (s), llama.cpp / moepage | {r['cap']:.0%} | {r['ttft_s']:.2f} | "
                  f"{peer_cell} | {ratio} |")


if __name__ == "__main__":
    main()
