"""Qwen3.5 / Qwen3.6 MoE (Qwen3.5-35B-A3B...): Gated DeltaNet linear attention in 3 of 4 layers, gated GQA in the
rest, zero-centred (1 + w) RMSNorms, a sigmoid-gated shared expert, softmax -> top-k renormalised routing.

The published checkpoints are the multimodal wrapper (model_type qwen3_5_moe: the text config under text_config,
weights under model.language_model.*, lm_head.weight at the top; model.visual.* and mtp.* are never read); the
text-only layout (qwen3_5_moe_text) keeps the text keys flat and the weights under model.*.
"""
from __future__ import annotations

from moepage.engine.attention.gated_delta import CHECKPOINT_SUFFIX, PROJECTIONS, SHARED_WEIGHTS, GatedDeltaShape
from moepage.engine.families import common
from moepage.engine.families.spec import FamilySpec, Layout
from moepage.engine.model_args import (
    ConfigError, ModelArgs, common_args, experts_field, float_field, int_field,
)
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
LAYOUTS = {"qwen3_5_moe": Layout(text_config="text_config", prefix="model.language_model.")}
LINEAR_KINDS = ("full_attention", "linear_attention")


def linear_attention_names(layout: str) -> dict[str, str]:
    """The Gated DeltaNet layers' canonical names (layers.{L}.linear_attn.<name>) -> checkpoint names."""
    return {f"layers.{{L}}.linear_attn.{n}": "model.layers.{L}." + CHECKPOINT_SUFFIX[n]
            for n in PROJECTIONS[layout] + SHARED_WEIGHTS}


NAMES = {**common.ATTENTION, **common.QWEN_MLP, **linear_attention_names("qwen3_5_moe")}
EXPERT_NAMES = common.QWEN_EXPERTS


def layer_types(config: dict, layers: int) -> list[str]:
    """config.json layer_types, or (older configs) every full_attention_interval-th layer full."""
    types = config.get("layer_types")
    if types is None:
        every = int_field(config, "full_attention_interval", 4, hi=max(1, layers))
        return ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or not all(t in LINEAR_KINDS for t in types):
        raise ConfigError(f"layer_types must list {layers} entries, each one of {', '.join(LINEAR_KINDS)}")
    return list(types)


def partial_rotary_factor(config: dict) -> float:
    params = config.get("rope_parameters")
    where = params if isinstance(params, dict) and "partial_rotary_factor" in params else config
    factor = float_field(where, "partial_rotary_factor", 0.25)
    if factor > 1:
        raise ConfigError(f"partial_rotary_factor {factor} must be at most 1")
    return factor


def hybrid_fields(config: dict, layout: str) -> dict:
    """The ModelArgs fields both hybrid Qwen families read the same way."""
    layers = int_field(config, "num_hidden_layers")
    for key in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"):
        int_field(config, key, hi=1 << 16)
    int_field(config, "linear_conv_kernel_dim", 4, hi=64)
    try:
        shape = GatedDeltaShape.from_config(config)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    return dict(
        num_experts=experts_field(config, "num_experts"),
        moe_intermediate_size=int_field(config, "moe_intermediate_size", lo=0),
        shared_expert_intermediate_size=int_field(config, "shared_expert_intermediate_size", 0, lo=0),
        shared_expert_gate=True,
        qk_norm="head",
        qkv_bias=bool(config.get("attention_bias", False)),
        o_bias=bool(config.get("attention_bias", False)),
        attn_output_gate=True,
        partial_rotary_factor=partial_rotary_factor(config),
        norm_unit_offset=True,
        layer_types=layer_types(config, layers),
        linear_attention={"layout": layout, "hidden": shape.hidden, "num_k_heads": shape.num_k_heads,
                          "num_v_heads": shape.num_v_heads, "k_head_dim": shape.k_head_dim,
                          "v_head_dim": shape.v_head_dim, "conv_kernel": shape.conv_kernel,
                          "rms_norm_eps": shape.rms_norm_eps},
    )


def model_args(config: dict) -> ModelArgs:
    return common_args(
        config, "qwen3_5_moe",
        routing=RoutingConfig(top_k=int_field(config, "num_experts_per_tok"), norm_topk_prob=True),
        **hybrid_fields(config, "qwen3_5_moe"),
    )


SPEC = FamilySpec(
    name="qwen3_5_moe", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=LINEAR_KINDS, layouts=LAYOUTS,
)
