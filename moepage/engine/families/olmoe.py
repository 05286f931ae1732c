"""OLMoE: q/k RMSNorm over all heads at once, optional qkv clipping, softmax -> top-k routing."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import ModelArgs, bool_field, common_args, experts_field, float_field, int_field
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("olmoe",)
NAMES = {**common.ATTENTION, **common.QWEN_MLP}
EXPERT_NAMES = common.QWEN_EXPERTS


def model_args(config: dict) -> ModelArgs:
    return common_args(
        config, "olmoe",
        head_dim=int_field(config, "hidden_size") // int_field(config, "num_attention_heads"),
        rms_norm_eps=float_field(config, "rms_norm_eps", 1e-5),
        max_position_embeddings=int_field(config, "max_position_embeddings", 4096),
        num_experts=experts_field(config, "num_experts"),
        moe_intermediate_size=int_field(config, "intermediate_size", lo=0),
        routing=RoutingConfig(
            top_k=int_field(config, "num_experts_per_tok"), norm_topk_prob=bool_field(config, "norm_topk_prob", False)
        ),
        qk_norm="full",
        qkv_bias=bool_field(config, "attention_bias", False),
        o_bias=bool_field(config, "attention_bias", False),
        clip_qkv=float_field(config, "clip_qkv", None),
    )


def gguf_config(f) -> dict:
    return {"num_experts": f.experts, "intermediate_size": f.expert_ffn,
            "clip_qkv": f.number("attention.clamp_kqv", None) if f.get("attention.clamp_kqv") else None,
            "attention_bias": f.has("blk.0.attn_q.bias")}


SPEC = FamilySpec(
    name="olmoe", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    dense_model_type="olmo2", gguf_arch="olmoe", gguf_norm_topk=False, gguf_norm_topk_fixed=True,
    gguf_config=gguf_config,
)
