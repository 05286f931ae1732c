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


def run_moepage(a, prompt):
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.sampling import SamplingParams

    cfg = EngineConfig(a.model, memory_budget=a.memory_budget, ctx_size=a.ctx, threads=a.threads,
                       prefetch=not a.no_prefetch, policy=a.policy, dtype=a.dtype)
    engine = Engine.load(cfg)
    stamps, tokens = [], []
    t0 = time.perf_counter()
    for step in engine.generate(prompt, SamplingParams(max_tokens=a.decode, temperature=0, ignore_eos=True)):
        stamps.append(time.perf_counter())
        tokens.append(step.token)
        if stamps[-1] - t0 > a.time_limit:
            break
    extra = {"cache": engine.cache.stats.snapshot(), "plan": engine.plan.summary()}
    return t0, stamps, tokens, extra


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
    return t0, stamps, tokens, {}


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
    return t0, stamps, tokens, {}


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
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--hf-dtype", default="bfloat16")
    ap.add_argument("--time-limit", type=float, default=120.0)
    a = ap.parse_args()
    with open(a.prompt_ids) as f:
        prompt = json.load(f)
    runner = {"moepage": run_moepage, "llamacpp": run_llamacpp, "transformers": run_transformers}[a.system]
    t0, stamps, tokens, extra = runner(a, prompt)
    ttft = stamps[0] - t0 if stamps else None
    decode_tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    out = {
        "system": a.system, "ttft_s": ttft, "prefill_tps": len(prompt) / ttft if ttft else None,
        "decode_tps": decode_tps, "tokens": tokens, "n_decoded": len(tokens),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **extra,
    }
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
