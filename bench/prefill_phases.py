"""Where a layer-major prefill's time goes on a GGUF under a memory budget: attention, waiting for expert reads,
the expert FFNs and the rest of the MoE block, over the first LAYERS layers (a full 48-layer prefill on a shared
2-core machine takes longer than a bench row may).

    python bench/prefill_phases.py FILE.gguf TOKENS BUDGET_GIB LAYERS THREADS

Prints one line: total seconds, seconds per phase, MiB of experts read.
"""
from __future__ import annotations

import random
import sys
import time

import torch

import moepage.engine.layered_prefill as lp
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.quantized_expert import QuantizedExpert


def main():
    gguf, n, budget, layers, threads = sys.argv[1], int(sys.argv[2]), int(float(sys.argv[3]) * 2**30), \
        int(sys.argv[4]), int(sys.argv[5])
    e = Engine.load(EngineConfig(gguf, memory_budget=budget, ctx_size=n + 64, threads=threads, io_threads=4,
                                 tokenizer=False))
    m = e.model
    m.layers = m.layers[:layers]
    rng = random.Random(1)
    ids = [rng.randrange(0, 150000) for _ in range(n)]
    spent: dict[str, float] = {}

    def timed(name, f):
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return g

    for layer in m.layers:
        layer.mixer.forward = timed("attention", layer.mixer.forward)
        if layer.moe:
            layer.moe.experts = timed("moe_block", layer.moe.experts)
    QuantizedExpert.compute = timed("expert_ffn", QuantizedExpert.compute)
    e.cache.acquire = timed("waiting_for_reads", e.cache.acquire)
    t = time.perf_counter()
    bounds = [(s, min(s + e.cfg.prefill_chunk, n)) for s in range(0, n, e.cfg.prefill_chunk)]
    with torch.inference_mode():
        lp.prefill_layer_major(m, torch.tensor(ids), e.kv, 0, bounds)
    print(f"threads {threads} layers {layers} tokens {n}: {time.perf_counter() - t:.1f} s",
          {k: round(v, 2) for k, v in spent.items()}, f"{e.cache.stats.snapshot()['bytes_read'] / 2**20:.0f} MiB read")
    e.close()


if __name__ == "__main__":
    main()
