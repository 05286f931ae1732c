"""Run one system (moepage | llamacpp | transformers) once on a prompt and print one JSON line.

Meant to be started by bench.py inside a cgroup; measures what a user sees: time to first token,
prefill and decode tokens/s, peak RSS, and the greedy tokens (to check paging never changes them).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from moepage.commands.bench import timings


def run_moepage(a, prompt):
    from moepage.commands.bench import measure
    from moepage.engine.engine import Engine, EngineConfig

    cfg = EngineConfig(a.model, memory_budget=a.memory_budget, ctx_size=a.ctx, threads=a.threads,
                       prefetch=not a.no_prefetch, pregate=a.pregate and not a.no_prefetch, policy=a.policy, dtype=a.dtype,
                       io_threads=a.io_threads, trace=a.trace, tokenizer=False, verify_shards=not a.no_verify)
    engine = Engine.load(cfg)
    try:
        return measure(engine, prompt, a.decode, a.time_limit)
    finally:
        engine.close()


def run_llamacpp(a, prompt):
    from llama_cpp import Llama

    llm = Llama(model_path=a.gguf, n_ctx=a.ctx, n_threads=a.threads, n_threads_batch=a.threads, verbose=False,
                n_batch=512)
    stamps, tokens = [], []
    t0 = time.perf_counter()
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        tokens.append(int(tok))
        if len(tokens) >= a.decode or stamps[-1] - t0 > a.time_limit:
            break
    return timings(t0, stamps, tokens, prompt)


def run_transformers(a, prompt):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.hf_dtype))
    stamps, tokens = [], []

    class Clock(BaseStreamer):
        first = True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            stamps.append(time.perf_counter())
            tokens.extend(value.flatten().tolist())

        def end(self):
            pass

    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), max_new_tokens=a.decode, do_sample=False, streamer=Clock(),
                       eos_token_id=None, pad_token_id=0, max_time=a.time_limit)
    return timings(t0, stamps, tokens, prompt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["moepage", "llamacpp", "transformers"])
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--prompt-ids", required=True, help="JSON file with a list of token ids")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--memory-budget", type=int, default=None)
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--pregate", action="store_true")
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--no-verify", action="store_true", help="a split directory's shards were checked by `moepage verify`")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--hf-dtype", default="bfloat16")
    ap.add_argument("--time-limit", type=float, default=120.0)
    a = ap.parse_args()
    with open(a.prompt_ids) as f:
        prompt = json.load(f)
    runner = {"moepage": run_moepage, "llamacpp": run_llamacpp, "transformers": run_transformers}[a.system]
    out = {"system": a.system, **runner(a, prompt),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
