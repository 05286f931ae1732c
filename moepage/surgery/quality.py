"""Perplexity of a MoE checkpoint on held-out text, through the moepage engine (for model cards)."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F


def perplexity(model_dir: str, texts: list[str], max_seq: int = 512, max_tokens: int = 16384) -> tuple[float, int]:
    """(perplexity, tokens scored) of texts under the MoE model in model_dir."""
    from moepage.engine.engine import Engine, EngineConfig

    engine = Engine.load(EngineConfig(model=model_dir))
    try:
        if engine.tokenizer is None:
            raise ValueError(f"{model_dir}: no tokenizer files; cannot score text")
        nll, scored = 0.0, 0
        for text in texts:
            ids = engine.tokenizer.encode(text)
            for s in range(0, len(ids), max_seq):
                window = ids[s : s + max_seq]
                if len(window) < 2 or scored >= max_tokens:
                    continue
                logits = engine.logits_all(window).float()  # [T, V]
                nll += F.cross_entropy(logits[:-1], torch.tensor(window[1:]), reduction="sum").item()
                scored += len(window) - 1
    finally:
        engine.close()
    if scored == 0:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    return math.exp(nll / scored), scored


def quality_table(base_dir: str, new_dir: str, name: str, eval_files: list[str]) -> dict:
    """Rows for the model card: base and new model perplexity on each evaluation file."""
    rows = []
    for path in eval_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: evaluation text file not found")
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for label, model_dir in (("base", base_dir), (name, new_dir)):
            ppl, tokens = perplexity(model_dir, [text])
            rows.append({"model": label, "text": os.path.basename(path), "tokens": tokens, "perplexity": ppl})
    return {"rows": rows}
