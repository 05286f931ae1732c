"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B): per-head q/k RMSNorm, softmax -> top-k routing."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.model_args import ModelArgs, eos_list, require, rope_from_config, sparse_layer_flags
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("qwen3_moe",)
GGUF_ARCH = "qwen3moe"
DENSE_MODEL_TYPE = "qwen3"
NAMES = {**common.ATTENTION, **common.QWEN_MLP}
EXPERT_NAMES = common.QWEN_EXPERTS


def model_args(config: dict) -> ModelArgs:
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    experts = int(require(config, "num_experts", "num_local_experts"))
    theta, scaling = rope_from_config(config)
    return ModelArgs(
        family="qwen3_moe",
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        num_experts=experts,
        moe_intermediate_size=int(config["moe_intermediate_size"]),
        intermediate_size=int(config.get("intermediate_size") or 0),
        routing=RoutingConfig(
            top_k=int(config["num_experts_per_tok"]), norm_topk_prob=bool(config.get("norm_topk_prob", False))
        ),
        sparse_layers=sparse_layer_flags(config, layers, experts),
        qk_norm="head",
        qkv_bias=bool(config.get("attention_bias", False)),
        o_bias=bool(config.get("attention_bias", False)),
        sliding_window=config.get("sliding_window") if config.get("use_sliding_window") else None,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        torch_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_list(config.get("eos_token_id")),
    )
