#!/usr/bin/env python
"""Teach the shipped demo model tool calls: a brief fine-tune of moepage/demo_model on synthetic agent transcripts
(moepage/surgery/tool_transcripts.py, rendered with the model's own chat template), mixed with replay of its
training corpus (the code domain with its ChatML Python answers, and the other domains) so what it knew stays.

    nice -n 19 python scripts/teach_tool_calls.py [--work build/demo] [--steps 45] [--threads 2]

Stage 8 of the demo build, after scripts/train_demo.py (whose corpus under --work it re-uses). The loss on a
transcript is taken on the assistant's tokens only (its call, its closing answer); on replay rows on every next
token. Writes the weights back into moepage/demo_model/model.safetensors (bf16; --out elsewhere) and
WORK/tools.json (losses, and how many of 20 held-out requests offering tools were answered with a well-formed call
to the right tool with the right arguments, greedy, through the moepage engine).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from train_demo import PACKAGE_DIR, ROOT, with_chat_examples  # noqa: E402

from moepage.engine.engine import Engine, EngineConfig  # noqa: E402  (imported up front: the save and the score
from moepage.engine.sampling import SamplingParams  # noqa: E402  must not depend on the tree after an hour of training)
from moepage.engine.tokenizer import Tokenizer  # noqa: E402
from moepage.server.tool_parsers import parse_all  # noqa: E402
from moepage.surgery.checkpoint_writer import ShardedWriter  # noqa: E402, F401
from moepage.surgery.corpus import DomainCorpus  # noqa: E402
from moepage.surgery.tool_transcripts import conversation, render, transcripts  # noqa: E402
from moepage.surgery.train import TrainConfig, sample_batch  # noqa: E402
from moepage.surgery.trainable_model import TrainableDecoder  # noqa: E402


def masked_loss(model: TrainableDecoder, ids: list[int], mask: list[bool]) -> torch.Tensor:
    x = torch.tensor(ids)[None]
    logits = model(x[:, :-1]).logits[0]  # [T-1, V]
    target = x[0, 1:]
    keep = torch.tensor(mask[1:])
    return F.cross_entropy(logits[keep], target[keep])


def _json(text: str | None):
    try:
        return json.loads(text or "null")
    except ValueError:  # a malformed call counts as a wrong one
        return None


def evaluate(model_dir: str, prose: str, n: int = 20, seed: int = 10_000) -> dict:
    """Greedy answers of the moepage engine to n held-out transcripts' first request (seeds not trained on)."""
    import random

    engine = Engine.load(EngineConfig(model=model_dir, ctx_size=2048, threads=2))
    good = offered = plain_ok = plain = 0
    try:
        k = 0
        while offered + plain < n:
            messages, tools = conversation(random.Random(seed + k), prose)
            k += 1
            prompt = engine.tokenizer.render_chat(messages[:2], tools, add_generation_prompt=True)
            ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
            text = "".join(s.text for s in engine.generate(ids, SamplingParams(max_tokens=40, temperature=0)))
            if tools is None:
                plain += 1
                plain_ok += "<tool_call>" not in text
                continue
            offered += 1
            want = messages[2]["tool_calls"][0]["function"]
            _, calls = parse_all(text, tools)
            good += bool(calls) and calls[0].name == want["name"] and _json(calls[0].arguments) == \
                json.loads(want["arguments"])
    finally:
        engine.close()
    return {"tool_requests": offered, "right_calls": good, "plain_requests": plain, "plain_without_call": plain_ok}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "demo"))
    ap.add_argument("--model", default=PACKAGE_DIR)
    ap.add_argument("--out", default=PACKAGE_DIR)
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="of the transcripts (a continued run takes another)")
    ap.add_argument("--eval-only", action="store_true", help="score --out as it is (no training)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    corpus_path = os.path.join(a.work, "corpus.npz")
    tok = Tokenizer.from_dir(a.model)
    corpus = DomainCorpus.load(corpus_path)
    prose = tok.decode(corpus.train["prose"][:400_000].tolist())
    tok_dir = os.path.join(a.work, "tokenizer") if os.path.isdir(os.path.join(a.work, "tokenizer")) else a.model
    if a.eval_only:
        print(json.dumps(evaluate(a.out, prose)))
        return
    replay = with_chat_examples(corpus, tok_dir)
    data = transcripts(tok, prose, a.steps, seed=a.seed, max_tokens=768)
    model = TrainableDecoder.from_pretrained(a.model)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rcfg = TrainConfig(mode="lm", steps=a.steps, batch_size=2, seq_len=128, seed=7)
    log = []
    t0 = time.perf_counter()
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / 10) * (0.1 + 0.9 * (1 - step / a.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        tool_loss = masked_loss(model, data[step].ids, data[step].mask)
        batch = sample_batch(replay, replay.domains, rcfg, step)
        logits = model(batch.ids[:, :-1]).logits
        replay_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.ids[:, 1:].reshape(-1))
        (tool_loss + replay_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append({"step": step, "tool_loss": round(tool_loss.item(), 4), "replay_loss": round(replay_loss.item(), 4)})
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step}: tool {tool_loss.item():.3f} replay {replay_loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    torch.save(model.state_dict(), os.path.join(a.work, "tools-state.pt"))  # kept whatever happens next
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, dtype=torch.bfloat16)
        os.makedirs(a.out, exist_ok=True)
        if os.path.abspath(a.out) != os.path.abspath(a.model):
            for name in os.listdir(a.model):
                if name != "model.safetensors" and os.path.isfile(os.path.join(a.model, name)):
                    shutil.copy(os.path.join(a.model, name), a.out)
        shutil.copy(os.path.join(tmp, "model.safetensors"), os.path.join(a.out, "model.safetensors"))
    result = {"steps": a.steps, "lr": a.lr, "seconds": round(time.perf_counter() - t0, 1), "first": log[0],
              "last": log[-1], "eval": evaluate(a.out, prose)}
    with open(os.path.join(a.work, "tools.json"), "w") as f:
        json.dump({**result, "log": log}, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
