"""Tiny random GLM-4.5-style (glm4_moe) checkpoints written by transformers' save_pretrained, as the published
repositories store them: bf16 weights, the router's e_score_correction_bias in float32 (moved off its zero init), a
dense first layer, one shared expert, more than one expert group."""
from __future__ import annotations

import json

import torch

GLM4_MOE = dict(
    vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts_per_tok=3, n_shared_experts=1,
    n_routed_experts=8, n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, use_qk_norm=True,
    attention_bias=True, routed_scaling_factor=2.5, max_position_embeddings=512, rms_norm_eps=1e-5,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5},
)


def glm4_moe_config(eos: int | None = None, **over):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**{**GLM4_MOE, "eos_token_id": eos, **over})


def randomize_glm(model: torch.nn.Module, seed: int) -> None:
    """Matrices N(0, 0.08); Llama-style norms 1 + 0.2 N (off their ones init), biases 0.2 N; each router's
    correction bias 0.15 N in float32 (as published), large enough to change which experts are chosen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.08 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.15 * torch.randn(b.shape, generator=g))


def save_glm4_moe(out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, **over):
    from transformers import Glm4MoeForCausalLM

    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(glm4_moe_config(**over))
    randomize_glm(model, seed)
    model.to(dtype)
    for layer in model.model.layers:  # the published checkpoints keep the correction bias in float32
        gate = getattr(layer.mlp, "gate", None)
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias = gate.e_score_correction_bias.float()
    model.save_pretrained(out_dir, max_shard_size="200KB")
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out_dir


def stored_dtypes(model_dir) -> dict[str, str]:
    """{tensor name: safetensors dtype} over every shard (headers only)."""
    import os

    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


def config_of(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())
