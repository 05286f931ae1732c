"""OLMoE: q/k RMSNorm over all heads at once, optional qkv clipping, softmax -> top-k routing."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.model_args import ModelArgs, common_args
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("olmoe",)
GGUF_ARCH = "olmoe"
DENSE_MODEL_TYPE = "olmo2"
NAMES = {**common.ATTENTION, **common.QWEN_MLP}
EXPERT_NAMES = common.QWEN_EXPERTS


def model_args(config: dict) -> ModelArgs:
    clip = config.get("clip_qkv")
    return common_args(
        config, "olmoe",
        head_dim=int(config["hidden_size"]) // int(config["num_attention_heads"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        num_experts=int(config["num_experts"]),
        moe_intermediate_size=int(config["intermediate_size"]),
        routing=RoutingConfig(
            top_k=int(config["num_experts_per_tok"]), norm_topk_prob=bool(config.get("norm_topk_prob", False))
        ),
        qk_norm="full",
        qkv_bias=bool(config.get("attention_bias", False)),
        o_bias=bool(config.get("attention_bias", False)),
        clip_qkv=float(clip) if clip is not None else None,
    )
