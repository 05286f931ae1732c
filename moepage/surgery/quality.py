"""Perplexity of an extracted / pruned checkpoint on held-out text (for model cards).

MoE checkpoints are scored through the moepage engine (the serving path). Dense results of `extract --dense`
are scored through moepage's own dense forward (surgery/trainable_model.TrainableDecoder: the same kernels as
the engine) for Qwen2/Qwen3, and through transformers for the other dense families (Mistral). Every model sees
the same token windows of the same text in fp32, so base and new rows compare.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

from moepage.engine.families import SPECS

# the dense twins of the MoE families (llama: Mixtral's GGUF architecture name), scored with transformers
DENSE_MODEL_TYPES = tuple(s.dense_model_type for s in SPECS if s.dense_model_type) + ("llama",)


def _model_type(model_dir: str) -> str | None:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None  # a split directory or a GGUF file: the engine knows
    with open(path) as f:
        return json.load(f).get("model_type")


def scorer(model_dir: str) -> tuple[Callable[[list[int]], torch.Tensor], object, Callable[[], None], str]:
    """(logits_all(ids) -> [T, V] float, tokenizer, close, how) for an MoE or a dense checkpoint."""
    from moepage.engine.tokenizer import Tokenizer

    model_type = _model_type(model_dir)
    if model_type not in DENSE_MODEL_TYPES:
        from moepage.engine.engine import Engine, EngineConfig

        engine = Engine.load(EngineConfig(model=model_dir, dtype="float32"))
        if engine.tokenizer is None:
            engine.close()
            raise ValueError(f"{model_dir}: no tokenizer files; cannot score text")
        return (lambda ids: engine.logits_all(ids).float()), engine.tokenizer, engine.close, "moepage engine (fp32)"
    try:
        tokenizer = Tokenizer.from_dir(model_dir)
    except FileNotFoundError:
        raise ValueError(f"{model_dir}: no tokenizer files; cannot score text") from None
    if model_type in ("qwen2", "qwen3"):
        from moepage.surgery.trainable_model import TrainableDecoder

        model = TrainableDecoder.from_pretrained(model_dir).eval()
        how = "moepage dense forward (fp32)"
    else:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise ValueError(f"{model_dir}: scoring a dense {model_type} model needs transformers "
                             "(`pip install transformers`)") from None
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        how = "transformers (fp32)"

    def logits_all(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()

    return logits_all, tokenizer, (lambda: None), how


def _score(logits_all, tokenizer, texts: list[str], max_seq: int, max_tokens: int) -> tuple[float, int]:
    nll, scored = 0.0, 0
    for text in texts:
        ids = tokenizer.encode(text)
        for s in range(0, len(ids), max_seq):
            window = ids[s : s + max_seq]
            if len(window) < 2 or scored >= max_tokens:
                continue
            logits = logits_all(window)  # [T, V]
            nll += F.cross_entropy(logits[:-1], torch.tensor(window[1:]), reduction="sum").item()
            scored += len(window) - 1
    if scored == 0:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    return math.exp(nll / scored), scored


def perplexity(model_dir: str, texts: list[str], max_seq: int = 512, max_tokens: int = 16384) -> tuple[float, int]:
    """(perplexity, tokens scored) of texts under the MoE or dense model in model_dir."""
    logits_all, tokenizer, close, _ = scorer(model_dir)
    try:
        return _score(logits_all, tokenizer, texts, max_seq, max_tokens)
    finally:
        close()


def quality_table(base_dir: str, new_dir: str, name: str, eval_files: list[str]) -> dict:
    """Rows for the model card: base and new model perplexity on each evaluation file (same token windows)."""
    texts = []
    for path in eval_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: evaluation text file not found")
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append((os.path.basename(path), f.read()))
    from moepage.progress import bar

    rows = {}
    progress = bar(desc="perplexity --eval", total=2 * len(texts), unit="file")
    for label, model_dir in (("base", base_dir), (name, new_dir)):
        logits_all, tokenizer, close, how = scorer(model_dir)
        try:
            for i, (fname, text) in enumerate(texts):
                progress.update()
                ppl, tokens = _score(logits_all, tokenizer, [text], 512, 16384)
                rows[(i, label)] = {"model": label, "text": fname, "tokens": tokens, "perplexity": ppl, "scored_by": how}
        finally:
            close()
    progress.close()
    return {"rows": [rows[(i, label)] for i in range(len(texts)) for label in ("base", name)]}
