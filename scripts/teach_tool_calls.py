#!/usr/bin/env python
"""Teach the shipped demo model tool calls: a brief fine-tune of moepage/demo_model on synthetic agent transcripts
(moepage/surgery/tool_transcripts.py, rendered with the model's own chat template), mixed with replay of its
training corpus (the code domain with its ChatML Python answers, and the other domains) so what it knew stays.

    nice -n 19 python scripts/teach_tool_calls.py [--work build/demo] [--steps 64] [--batch 8] [--threads 2]
    python scripts/teach_tool_calls.py --model TUNED --base BEFORE --interpolate 0.9 --out moepage/demo_model

(the shipped weights' exact runs are on the model card, moepage/demo_model/README.md, *Tool calls*).

Stage 8 of the demo build, after scripts/train_demo.py (whose corpus under --work it re-uses). The loss on a
transcript is taken on the assistant's tokens only (its call, its closing answer); on replay rows on every next
token. Each step takes --batch transcripts (right-padded: the causal mask keeps padding out of every real
token's context). Writes the weights back into moepage/demo_model/model.safetensors (bf16; --out elsewhere) and
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

from train_demo import CHAT_QUESTIONS, PACKAGE_DIR, ROOT, with_chat_examples  # noqa: E402

from moepage.engine.engine import Engine, EngineConfig  # noqa: E402  (imported up front: the save and the score
from moepage.engine.sampling import SamplingParams  # noqa: E402  must not depend on the tree after an hour of training)
from moepage.engine.tokenizer import Tokenizer  # noqa: E402
from moepage.server.tool_parsers import parse_all  # noqa: E402
from moepage.surgery.checkpoint_writer import ShardedWriter  # noqa: E402, F401
from moepage.surgery.corpus import DomainCorpus  # noqa: E402
from moepage.surgery.tool_transcripts import conversation, opencode_conversation, render, transcripts  # noqa: E402
from moepage.surgery.train import TrainConfig, sample_batch  # noqa: E402
from moepage.surgery.trainable_model import TrainableDecoder  # noqa: E402


def masked_loss(model: TrainableDecoder, batch: list) -> torch.Tensor:
    """Mean next-token loss over the assistant's tokens of a batch of Transcripts (B rows, T the longest)."""
    T = max(len(t.ids) for t in batch)
    x = torch.tensor([t.ids + [0] * (T - len(t.ids)) for t in batch])  # [B, T]
    keep = torch.tensor([t.mask + [False] * (T - len(t.mask)) for t in batch])[:, 1:]  # [B, T-1]
    logits = model(x[:, :-1]).logits  # [B, T-1, V]
    return F.cross_entropy(logits[keep], x[:, 1:][keep])


def code_chats(tok: Tokenizer, corpus: DomainCorpus, count: int, seed: int, answer_tokens: int = 120) -> list:
    """Transcripts of a Python question (train_demo's CHAT_QUESTIONS, no system prompt, no tools) answered with the
    first answer_tokens tokens of a def/class block of the code training text: keeps a chat about Python answered
    with code while the model learns that a request offering tools gets a call."""
    import random
    import re

    blocks = re.split(r"\n(?=(?:def|class) )", tok.decode(corpus.train["code"][:400_000].tolist()))[1:]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        answer = tok.decode(tok.encode(rng.choice(blocks).strip("\n"), add_special_tokens=False)[:answer_tokens])
        out.append(render(tok, [{"role": "user", "content": rng.choice(CHAT_QUESTIONS)},
                                {"role": "assistant", "content": answer}], None))
    return out


def _json(text: str | None):
    try:
        return json.loads(text or "null")
    except ValueError:  # a malformed call counts as a wrong one
        return None


def evaluate(model_dir: str, prose: str, n: int = 20, seed: int = 10_000) -> dict:
    """Greedy answers of the moepage engine to n held-out transcripts' first request (seeds not trained on)."""
    import random

    engine = Engine.load(EngineConfig(model=model_dir, ctx_size=2048, threads=2))
    good = offered = plain_ok = plain = opencode = 0
    try:
        for k in range(n):  # OpenCode's own shape (opencode_conversation), held out the same way
            messages, tools = opencode_conversation(random.Random(seed + 50_000 + k), prose)
            prompt = engine.tokenizer.render_chat(messages[:2], tools, add_generation_prompt=True)
            ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
            text = "".join(s.text for s in engine.generate(ids, SamplingParams(max_tokens=40, temperature=0)))
            _, calls = parse_all(text, tools)
            want = messages[2]["tool_calls"][0]["function"]
            opencode += bool(calls) and calls[0].name == "glob" and _json(calls[0].arguments) == \
                json.loads(want["arguments"])
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
    return {"tool_requests": offered, "right_calls": good, "plain_requests": plain, "plain_without_call": plain_ok,
            "opencode_requests": n, "opencode_right_calls": opencode}


def interpolate(base: str, tuned: str, alpha: float, out: str):
    """base + alpha x (tuned - base), tensor by tensor in fp32, stored in the base's dtype (weight-space ensembling
    of the fine-tune with the weights before it: keeps more of what the base did, a little less of the new skill)."""
    from safetensors.torch import load_file, save_file

    w0, w1 = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(tuned, "model.safetensors"))
    if w0.keys() != w1.keys():
        raise ValueError("the two checkpoints hold different tensors")
    mixed = {k: (w0[k].float() + alpha * (w1[k].float() - w0[k].float())).to(w0[k].dtype) for k in w0}
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(tuned):
        if name != "model.safetensors" and os.path.isfile(os.path.join(tuned, name)) and \
                os.path.abspath(out) != os.path.abspath(tuned):
            shutil.copy(os.path.join(tuned, name), out)
    save_file(mixed, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "demo"))
    ap.add_argument("--model", default=PACKAGE_DIR)
    ap.add_argument("--out", default=PACKAGE_DIR)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="transcripts per step")
    ap.add_argument("--code-chats", type=int, default=4, help="Python chat transcripts per step (code answers)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="of the transcripts (a continued run takes another)")
    ap.add_argument("--eval-only", action="store_true", help="score --out as it is (no training)")
    ap.add_argument("--interpolate", type=float, default=None, metavar="A",
                    help="no training: write --base + A x (--model - --base) to --out and score it")
    ap.add_argument("--base", default=None, help="the weights before the fine-tune (for --interpolate)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    corpus_path = os.path.join(a.work, "corpus.npz")
    tok = Tokenizer.from_dir(a.model)
    corpus = DomainCorpus.load(corpus_path)
    prose = tok.decode(corpus.train["prose"][:400_000].tolist())
    tok_dir = os.path.join(a.work, "tokenizer") if os.path.isdir(os.path.join(a.work, "tokenizer")) else a.model
    if a.interpolate is not None:
        interpolate(a.base, a.model, a.interpolate, a.out)
        print(json.dumps({"interpolate": a.interpolate, "eval": evaluate(a.out, prose)}))
        return
    if a.eval_only:
        print(json.dumps(evaluate(a.out, prose)))
        return
    replay = with_chat_examples(corpus, tok_dir)
    data = transcripts(tok, prose, a.steps * a.batch, seed=a.seed, max_tokens=800)
    chats = code_chats(tok, corpus, a.steps * a.code_chats, seed=a.seed)
    model = TrainableDecoder.from_pretrained(a.model)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rcfg = TrainConfig(mode="lm", steps=a.steps, batch_size=4, seq_len=128, seed=7)
    log = []
    t0 = time.perf_counter()
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / 10) * (0.1 + 0.9 * (1 - step / a.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        tool_loss = masked_loss(model, data[step * a.batch : (step + 1) * a.batch])
        if a.code_chats:
            tool_loss = tool_loss + masked_loss(model, chats[step * a.code_chats : (step + 1) * a.code_chats])
        batch = sample_batch(replay, replay.domains, rcfg, step)
        logits = model(batch.ids[:, :-1]).logits
        replay_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.ids[:, 1:].reshape(-1))
        (tool_loss + replay_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append({"step": step, "tool_loss": round(tool_loss.item(), 4), "replay_loss": round(replay_loss.item(), 4)})
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
    result = {"steps": a.steps, "batch": a.batch, "code_chats": a.code_chats, "lr": a.lr, "model": a.model, "seconds": round(time.perf_counter() - t0, 1), "first": log[0],
              "last": log[-1], "eval": evaluate(a.out, prose)}
    with open(os.path.join(a.work, "tools.json"), "w") as f:
        json.dump({**result, "log": log}, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
