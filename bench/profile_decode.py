"""Where one resident decode step goes: wall time per token in the lm_head, the routed experts, the attention
projections and the rest, measured with timers around the model's parts (the numbers in the README).

    python bench/profile_decode.py MODEL [--prompt-tokens 512] [--decode 64]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import moepage.engine.model as model_module  # noqa: E402
import moepage.engine.moe as moe_module  # noqa: E402
from moepage.commands.bench import prompt_from_corpus  # noqa: E402
from moepage.engine.engine import Engine, EngineConfig  # noqa: E402
from moepage.engine.sampling import SamplingParams  # noqa: E402
from moepage.engine.tokenizer import Tokenizer  # noqa: E402
from moepage.paging.bf16_12bit import PackedMatrix  # noqa: E402

SPENT: collections.Counter = collections.Counter()


def timed(fn, key):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            SPENT[key] += time.perf_counter() - t
    return wrapper


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompt = prompt_from_corpus(Tokenizer.from_dir(a.model), a.prompt_tokens)
    engine = Engine.load(EngineConfig(a.model, ctx_size=a.prompt_tokens + a.decode + 8, tokenizer=False))
    big = engine.args.vocab_size
    linear = model_module.linear
    model_module.linear = lambda x, w, b=None: timed(linear, "lm_head matvec" if w.shape[0] == big and w.dim() == 2
                                                     and x.shape[0] == 1 else "attention projections")(x, w, b)
    head = engine.model.lm_head
    if isinstance(head, PackedMatrix):  # held in the 12-bit form: its own fused decode + matvec kernel
        head.linear = timed(head.linear, "lm_head matvec (12-bit)")
    moe_module.experts_one_token = timed(moe_module.experts_one_token, "routed experts (fused kernel)")
    kernel = engine.model._decode_kernel
    if kernel is not None:  # the attention half of each layer runs in one C++ call
        class Timed:
            attention_decode = staticmethod(timed(kernel.attention_decode, "attention half (fused kernel)"))
        engine.model._decode_kernel = Timed()
    moe_module.route = timed(moe_module.route, "routing (softmax, top-k)")
    forward = timed(engine.model.forward, "forward")
    engine.model.forward = forward
    t0 = None
    for i, _ in enumerate(engine.generate(prompt, SamplingParams(max_tokens=a.decode + 1, temperature=0, ignore_eos=True))):
        if i == 0:
            SPENT.clear()
            t0 = time.perf_counter()
    total = time.perf_counter() - t0
    n = a.decode
    print(f"{n / total:.2f} tok/s; per token:")
    rest = SPENT["forward"] - sum(v for k, v in SPENT.items() if k != "forward")
    for k, v in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"  {k:32s} {v / n * 1e3:7.2f} ms")
    print(f"  {'rest of forward (norms, RoPE, KV, attention, routing, Python)':32s} {rest / n * 1e3:7.2f} ms")
    engine.close()


if __name__ == "__main__":
    main()
