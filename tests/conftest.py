"""Tiny random checkpoints built with transformers (the reference) and a locally trained tokenizer."""
from __future__ import annotations

import json
import os

import pytest
import torch

from moepage.surgery.tokenizer_builder import build_tokenizer, local_corpus, save_tokenizer

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def family_config(family: str, vocab: int, eos: int, **over):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=eos, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    common.update(over)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                              intermediate_size=96, mlp_only_layers=[1], norm_topk_prob=True)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, intermediate_size=96, decoder_sparse_step=1,
                              mlp_only_layers=[2])
    if family == "mixtral":
        return MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
    if family == "olmoe":
        return OlmoeConfig(**{"clip_qkv": 8.0, **common}, num_experts=8, num_experts_per_tok=2, intermediate_size=32)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    info = save_tokenizer(build_tokenizer(local_corpus(200_000), vocab_size=400), str(d))
    (d / "info.json").write_text(json.dumps(info))
    return d


def save_random_checkpoint(cfg, out_dir, tokenizer_dir, seed: int = 0, dtype=torch.float32):
    """A transformers model of `cfg`, randomly initialised with seed, saved with the test tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Larger init than the default 0.02 so tiny random models have decisive logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.to(dtype).save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out_dir


def make_checkpoint(out_dir, family: str, tokenizer_dir, dtype=torch.float32, seed: int = 0, **over):
    info = json.loads((tokenizer_dir / "info.json").read_text())
    cfg = family_config(family, info["vocab_size"], info["eos_token_id"], **over)
    return save_random_checkpoint(cfg, out_dir, tokenizer_dir, seed, dtype)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """{(family, dtype_name): path}, built lazily and cached for the session."""
    cache = {}

    def get(family: str, dtype: str = "float32"):
        key = (family, dtype)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{family}-{dtype}")
            cache[key] = make_checkpoint(d, family, tokenizer_dir, getattr(torch, dtype))
        return cache[key]

    return get


def reference_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")
    m.eval()
    return m


def prompt_ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 8, (n,), generator=g).tolist()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
