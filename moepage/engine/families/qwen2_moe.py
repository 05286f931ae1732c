"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): qkv bias, shared expert behind a sigmoid gate."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import (
    ModelArgs, bool_field, common_args, experts_field, int_field, sparse_layer_flags,
)
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("qwen2_moe",)
NAMES = {**common.ATTENTION, **common.QWEN_MLP}
EXPERT_NAMES = common.QWEN_EXPERTS


def model_args(config: dict) -> ModelArgs:
    experts = experts_field(config, "num_experts")
    return common_args(
        config, "qwen2_moe",
        head_dim=int_field(config, "hidden_size") // int_field(config, "num_attention_heads"),
        num_experts=experts,
        moe_intermediate_size=int_field(config, "moe_intermediate_size", lo=0),
        intermediate_size=int_field(config, "intermediate_size", 0, lo=0),
        shared_expert_intermediate_size=int_field(config, "shared_expert_intermediate_size", 0, lo=0),
        shared_expert_gate=True,
        routing=RoutingConfig(
            top_k=int_field(config, "num_experts_per_tok"), norm_topk_prob=bool_field(config, "norm_topk_prob", False)
        ),
        sparse_layers=sparse_layer_flags(config, int_field(config, "num_hidden_layers"), experts),
        qkv_bias=bool_field(config, "qkv_bias", True),
    )


def gguf_config(f) -> dict:
    return {"num_experts": f.experts, "moe_intermediate_size": f.expert_ffn, "intermediate_size": f.ffn,
            "shared_expert_intermediate_size": f.count("expert_shared_feed_forward_length", 0, lo=0),
            "qkv_bias": f.has("blk.0.attn_q.bias")}


SPEC = FamilySpec(
    name="qwen2_moe", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    dense_model_type="qwen2", gguf_arch="qwen2moe", gguf_norm_topk=False, gguf_norm_topk_fixed=True,
    gguf_config=gguf_config,
)
