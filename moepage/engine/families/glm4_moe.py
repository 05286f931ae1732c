"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (glm4_moe, GGUF glm4moe): GQA with q/k/v biases and no output bias, per-head q/k
RMSNorm (use_qk_norm), RoPE on the first half of each head (partial_rotary_factor 0.5), the sigmoid + correction-bias
group-limited router, one shared expert, dense first layers (first_k_dense_replace). The checkpoints' MTP layer
(model.layers.{num_hidden_layers}) is never named, so never read."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.families.sigmoid_moe import (
    GGUF_SHARED, SHARED_EXPERTS, dense_first_layers, shared_expert_size, sigmoid_routing,
)
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import ConfigError, ModelArgs, bool_field, common_args, experts_field, float_field, int_field

MODEL_TYPES = ("glm4_moe",)
NAMES = {**common.ATTENTION, **common.QWEN_MLP, **SHARED_EXPERTS}
EXPERT_NAMES = common.QWEN_EXPERTS


def model_args(config: dict) -> ModelArgs:
    layers = int_field(config, "num_hidden_layers")
    experts = experts_field(config, "n_routed_experts", "num_local_experts")
    moe_width = int_field(config, "moe_intermediate_size", lo=0)
    bias = bool_field(config, "attention_bias", False)
    params = config.get("rope_parameters")  # v5 keeps the factor there, the published v4 config.json at the top
    factor = float_field(params if isinstance(params, dict) and "partial_rotary_factor" in params else config,
                         "partial_rotary_factor", 0.5)
    if factor > 1:
        raise ConfigError(f"partial_rotary_factor {factor} must be at most 1")
    return common_args(
        config, "glm4_moe",
        num_experts=experts,
        moe_intermediate_size=moe_width,
        intermediate_size=int_field(config, "intermediate_size", 0, lo=0),
        shared_expert_intermediate_size=shared_expert_size(config, moe_width),
        routing=sigmoid_routing(config, experts),
        router_correction_bias=experts > 0,
        sparse_layers=dense_first_layers(config, layers, experts),
        qk_norm="head" if bool_field(config, "use_qk_norm", False) else None,
        qkv_bias=bias,
        partial_rotary_factor=factor,
    )


SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID ({arch}.expert_gating_func)
# llama.cpp names the post-attention norm attn_post_norm for this architecture and the correction bias exp_probs_b
GGUF_NAMES = {**common.GGUF, **GGUF_SHARED, "layers.{L}.ffn_norm": "blk.{L}.post_attention_norm.weight"}


def gguf_config(f) -> dict:
    head_dim = f.count("attention.key_length", 0, limit="head_dim", lo=0) or f.count("embedding_length") // f.count(
        "attention.head_count")
    gating = f.get("expert_gating_func", SIGMOID_GATING)
    if gating != SIGMOID_GATING:
        raise ConfigError(f"{f.path}: glm4moe.expert_gating_func is not {SIGMOID_GATING} (sigmoid), GLM-4.5's routing")
    return {"n_routed_experts": f.experts, "moe_intermediate_size": f.expert_ffn, "intermediate_size": f.ffn,
            "n_shared_experts": f.count("expert_shared_count", 0, lo=0),
            "first_k_dense_replace": f.count("leading_dense_block_count", 0, lo=0),
            "n_group": f.count("expert_group_count", 1), "topk_group": f.count("expert_group_used_count", 1),
            "routed_scaling_factor": f.number("expert_weights_scale", 1.0),
            "use_qk_norm": f.has("blk.0.attn_q_norm.weight"), "attention_bias": f.has("blk.0.attn_q.bias"),
            "partial_rotary_factor": f.count("rope.dimension_count", head_dim, limit="head_dim") / head_dim}


SPEC = FamilySpec(
    name="glm4_moe", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    gguf_arch="glm4moe", gguf_norm_topk=True, gguf_config=gguf_config, gguf_names=GGUF_NAMES,
)
