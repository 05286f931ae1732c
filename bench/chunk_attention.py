"""Why a long prompt's prefill slows down: one 512-token chunk through the whole model at several positions, with the
seconds spent in the token mixers (attention) apart from the rest, and the process's peak RSS growth over the
chunk (the chunk attention, moepage/kernels/chunk_attention.py, holds no [N, T, S] scores).

    python bench/chunk_attention.py --model DIR [--at 0,1536,9728] [--chunk 512] [--threads 2] [--repeat 2]

Prints one JSON line: per position, the median chunk seconds, the mixers' share, and CPU seconds (the process's,
less sensitive to a loaded machine than wall time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--at", default="0,1536,9728", help="positions the chunk starts at")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    import torch

    from moepage.engine.engine import Engine, EngineConfig

    at = [int(x) for x in a.at.split(",")]
    engine = Engine.load(EngineConfig(model=a.model, ctx_size=max(at) + a.chunk + 64, threads=a.threads,
                                      tokenizer=False))
    spent = [0.0]
    for layer in engine.model.layers:
        def timed(*args, _f=layer.mixer.forward, **kw):
            t = time.perf_counter()
            try:
                return _f(*args, **kw)
            finally:
                spent[0] += time.perf_counter() - t
        layer.mixer.forward = timed
    kv, out = engine.kv, {}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, min(engine.args.vocab_size, 150_000), (a.chunk,), generator=gen)
    with torch.inference_mode():
        for start in at:
            wall, mixer, cpu, before = [], [], [], rss("VmRSS")
            for _ in range(a.repeat):
                kv.rewind(0)
                kv.length = start  # the positions before the chunk (their values do not change the work)
                spent[0], t, c = 0.0, time.perf_counter(), time.process_time()
                engine.model.forward(tokens, kv, start=start)
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
                mixer.append(spent[0])
            out[start] = {"chunk_s": round(statistics.median(wall), 2), "mixers_s": round(statistics.median(mixer), 2),
                          "cpu_s": round(statistics.median(cpu), 2),
                          "peak_growth_mib": round((rss("VmHWM") - before) / 2**20, 1)}
    engine.close()
    print(json.dumps({"chunk": a.chunk, "threads": a.threads, "positions": out}), flush=True)


if __name__ == "__main__":
    main()
