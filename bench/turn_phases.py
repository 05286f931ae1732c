"""Where each turn's time to first token goes in the turns bench's conversation (bench/agent.py --parts turns), in
the server's own steps but in-process (no HTTP): the chat template and tokenizer, the prompt cache's look-up and
restore, each prefill chunk (its length and where it starts), and the first token's sampling. A title request
runs between turns, in the other slot, as OpenCode sends it.

    python bench/turn_phases.py --model DIR [--system-tokens 4000] [--ctx 6144] [--threads 2] [--memory-budget B]

Prints one JSON line per request; HTTP's share of a row in agent.json is its ttft_s less this total.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from agent import WORDS  # noqa: E402  (the turns bench's system prompt words)


def timed_request(engine, messages: list[dict], reply_tokens: int = 1) -> dict:
    from moepage.engine.sampling import SamplingParams
    from moepage.server.prompts import chat_prompt_ids
    from moepage.server.protocol import ChatMessage

    t0 = time.perf_counter()
    ids = chat_prompt_ids(engine.tokenizer, [ChatMessage(**m) for m in messages], ctx_size=engine.ctx_size)
    t_template = time.perf_counter() - t0
    with engine.lock:
        t = time.perf_counter()
        seq = engine.start(ids, SamplingParams(max_tokens=reply_tokens, temperature=0))
        chunks, first = [], True
        try:
            while True:
                c0, s = time.perf_counter(), seq.pos
                done = seq.prefill_chunk()
                if first:  # the first call also asks the prompt cache (look-up, restore)
                    s, first = seq.stats.cached_prompt_tokens, False
                chunks.append((s, seq.pos - s, round(time.perf_counter() - c0, 4)))
                if done:
                    break
            c0 = time.perf_counter()
            out = seq.sample()
            t_sample = time.perf_counter() - c0
        finally:
            seq.finish()
        total = time.perf_counter() - t0
    reply = engine.tokenizer.decode([out.token]) if out.token is not None else ""
    return {"prompt_tokens": len(ids), "cached_tokens": seq.stats.cached_prompt_tokens,
            "template_tokenize_s": round(t_template, 4), "start_s": round(t - t0 - t_template, 4),
            "chunks": chunks, "prefill_s": round(sum(c[2] for c in chunks), 3), "sample_s": round(t_sample, 4),
            "total_s": round(total, 3), "reply": reply}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--system-tokens", type=int, default=4000)
    ap.add_argument("--ctx", type=int, default=6144)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-budget", type=int, default=None)
    a = ap.parse_args()
    from moepage.engine.engine import Engine, EngineConfig

    engine = Engine.load(EngineConfig(model=a.model, memory_budget=a.memory_budget, ctx_size=a.ctx,
                                      threads=a.threads, parallel=2, prefix_cache=True))
    rng = random.Random(0)  # the conversation bench/agent.py's child_turns sends
    system = "You are a coding agent. Tools:\n" + " ".join(rng.choice(WORDS) for _ in range(a.system_tokens))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "List the files in src."}]
    try:
        for turn in range(3):
            r = timed_request(engine, messages)
            print(json.dumps({"request": f"turn {turn + 1}", **r}), flush=True)
            title = timed_request(engine, [{"role": "system", "content": "Write a short title for the conversation."},
                                           {"role": "user", "content": messages[1]["content"]}], 4)
            print(json.dumps({"request": f"title {turn + 1}", **title}), flush=True)
            messages += [{"role": "assistant", "content": r["reply"] or "ok"},
                         {"role": "user", "content": f"Now open file number {turn}."}]
    finally:
        engine.close()


if __name__ == "__main__":
    main()
