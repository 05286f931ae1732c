"""Mixtral: top-k over softmax then renormalised (same as top-k -> softmax), float32 routing weights."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.model_args import ModelArgs, eos_list, rope_from_config
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("mixtral",)
GGUF_ARCH = "llama"
DENSE_MODEL_TYPE = "mistral"
NAMES = {**common.ATTENTION, "layers.{L}.router": "model.layers.{L}.block_sparse_moe.gate.weight"}
EXPERT_NAMES = {
    "gate": "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
    "up": "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
    "down": "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
}


def model_args(config: dict) -> ModelArgs:
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    theta, scaling = rope_from_config(config)
    return ModelArgs(
        family="mixtral",
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        num_experts=int(config["num_local_experts"]),
        moe_intermediate_size=int(config["intermediate_size"]),
        routing=RoutingConfig(
            top_k=int(config["num_experts_per_tok"]), norm_topk_prob=True, weights_in_logits_dtype=False
        ),
        sparse_layers=[True] * layers,
        sliding_window=config.get("sliding_window"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        torch_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_list(config.get("eos_token_id")),
    )
