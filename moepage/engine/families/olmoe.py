"""OLMoE: q/k RMSNorm over all heads at once, optional qkv clipping, softmax -> top-k routing."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.model_args import ModelArgs, eos_list, rope_from_config
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("olmoe",)
GGUF_ARCH = "olmoe"
DENSE_MODEL_TYPE = "olmo2"
NAMES = {**common.ATTENTION, **common.QWEN_MLP}
EXPERT_NAMES = common.QWEN_EXPERTS


def model_args(config: dict) -> ModelArgs:
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    theta, scaling = rope_from_config(config)
    clip = config.get("clip_qkv")
    return ModelArgs(
        family="olmoe",
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config["hidden_size"]) // heads,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        num_experts=int(config["num_experts"]),
        moe_intermediate_size=int(config["intermediate_size"]),
        routing=RoutingConfig(
            top_k=int(config["num_experts_per_tok"]), norm_topk_prob=bool(config.get("norm_topk_prob", False))
        ),
        sparse_layers=[True] * layers,
        qk_norm="full",
        qkv_bias=bool(config.get("attention_bias", False)),
        o_bias=bool(config.get("attention_bias", False)),
        clip_qkv=float(clip) if clip is not None else None,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        torch_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_list(config.get("eos_token_id")),
    )
