"""A small local tokenizer with gpt-oss's Harmony special tokens and the published gpt-oss chat template (o200k
itself cannot be downloaded in tests)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from moepage.surgery.tokenizer_builder import build_tokenizer, local_corpus

TEMPLATE = (Path(__file__).parent / "data" / "gpt_oss_chat_template.jinja").read_text()
# o200k_harmony's special tokens (ids 199998-200012 there)
SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>",
           "<|message|>", "<|call|>"]


def save_harmony_tokenizer(out_dir, vocab_size: int = 400) -> dict:
    """tokenizer.json + tokenizer_config.json (eos <|return|>, the gpt-oss template) in out_dir; returns ids."""
    tok = build_tokenizer(local_corpus(100_000), vocab_size=vocab_size)
    tok.add_special_tokens(SPECIAL)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|return|>",
              "pad_token": "<|endoftext|>", "add_bos_token": False, "model_max_length": 131072,
              "chat_template": TEMPLATE}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "eos_token_ids": [ids["<|return|>"],
            ids["<|call|>"]], "pad_token_id": ids["<|endoftext|>"], "ids": ids}
