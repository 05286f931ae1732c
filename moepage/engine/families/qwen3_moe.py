"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B): per-head q/k RMSNorm, softmax -> top-k routing."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import (
    ModelArgs, bool_field, common_args, experts_field, int_field, sparse_layer_flags,
)
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("qwen3_moe",)
NAMES = {**common.ATTENTION, **common.QWEN_MLP}
EXPERT_NAMES = common.QWEN_EXPERTS


def model_args(config: dict) -> ModelArgs:
    experts = experts_field(config, "num_experts", "num_local_experts")
    return common_args(
        config, "qwen3_moe",
        num_experts=experts,
        moe_intermediate_size=int_field(config, "moe_intermediate_size", lo=0),
        intermediate_size=int_field(config, "intermediate_size", 0, lo=0),
        routing=RoutingConfig(
            top_k=int_field(config, "num_experts_per_tok"), norm_topk_prob=bool_field(config, "norm_topk_prob", False)
        ),
        sparse_layers=sparse_layer_flags(config, int_field(config, "num_hidden_layers"), experts),
        qk_norm="head",
        qkv_bias=bool_field(config, "attention_bias", False),
        o_bias=bool_field(config, "attention_bias", False),
    )


def gguf_config(f) -> dict:
    return {"num_experts": f.experts, "moe_intermediate_size": f.expert_ffn, "intermediate_size": f.ffn,
            "attention_bias": f.has("blk.0.attn_q.bias")}


SPEC = FamilySpec(
    name="qwen3_moe", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    dense_model_type="qwen3", gguf_arch="qwen3moe", gguf_norm_topk=True, gguf_norm_topk_fixed=True,
    gguf_config=gguf_config,
)
