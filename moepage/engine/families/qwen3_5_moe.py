"""Qwen3.5 / Qwen3.6 MoE (Qwen3.5-35B-A3B...): Gated DeltaNet linear attention in 3 of 4 layers, gated GQA in the
rest, zero-centred (1 + w) RMSNorms, a sigmoid-gated shared expert, softmax -> top-k renormalised routing.

The published checkpoints are the multimodal wrapper (model_type qwen3_5_moe: the text config under text_config,
weights under model.language_model.*, lm_head.weight at the top; model.visual.* and mtp.* are never read); the
text-only layout (qwen3_5_moe_text) keeps the text keys flat and the weights under model.*.
"""
from __future__ import annotations

from dataclasses import replace

import re

import torch

from moepage.engine.attention.gated_delta import CHECKPOINT_SUFFIX, PROJECTIONS, SHARED_WEIGHTS, GatedDeltaShape
from moepage.engine.families import common
from moepage.engine.families.spec import FamilySpec, Layout
from moepage.engine.model_args import (
    ConfigError, ModelArgs, bool_field, common_args, experts_field, float_field, int_field,
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
# llama.cpp's names (conversion/qwen.py): the post-attention norm keeps its name, the DeltaNet weights are ssm_*
GGUF_NAMES = {**common.GGUF, "layers.{L}.ffn_norm": "blk.{L}.post_attention_norm.weight", **{
    f"layers.{{L}}.linear_attn.{n}": f"blk.{{L}}.{g}" for n, g in (
        ("in_proj_qkv", "attn_qkv.weight"), ("in_proj_z", "attn_gate.weight"), ("in_proj_b", "ssm_beta.weight"),
        ("in_proj_a", "ssm_alpha.weight"), ("conv1d", "ssm_conv1d.weight"), ("dt_bias", "ssm_dt.bias"),
        ("A_log", "ssm_a"), ("norm", "ssm_norm.weight"), ("out_proj", "ssm_out.weight"))}}
OFFSET_NORMS = re.compile(r"^(output_norm|blk\.\d+\.(attn_norm|post_attention_norm|attn_q_norm|attn_k_norm))\.weight$")


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
    if bool_field(config, "linear_value_heads_tiled", False):  # set by gguf_config: llama.cpp's head order
        shape = replace(shape, tiled_value_heads=True)
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
                          "rms_norm_eps": shape.rms_norm_eps, "tiled_value_heads": shape.tiled_value_heads},
    )


def model_args(config: dict) -> ModelArgs:
    return common_args(
        config, "qwen3_5_moe",
        routing=RoutingConfig(top_k=int_field(config, "num_experts_per_tok"), norm_topk_prob=True),
        **hybrid_fields(config, "qwen3_5_moe"),
    )


def hybrid_gguf_config(f, model_type: str, tiled: bool) -> dict:
    """config.json keys from a qwen35moe / qwen3next GGUF (llama.cpp's converter; its MTP blocks, if written, are
    not read). tiled: the converter reordered the value heads (qwen35moe) so value head h reads key head h % Hk."""
    layers = f.count("block_count", limit="num_hidden_layers") - f.count("nextn_predict_layers", 0, lo=0)
    recurrent = f.get("attention.recurrent_layers")
    if isinstance(recurrent, list) and len(recurrent) >= layers:
        types = ["linear_attention" if r else "full_attention" for r in recurrent[:layers]]
    else:
        every = f.count("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]
    v_heads, head_dim = f.count("ssm.time_step_rank"), \
        f.count("attention.key_length", limit="head_dim")
    return {"model_type": model_type, "num_hidden_layers": layers, "layer_types": types,
            "num_experts": f.experts, "moe_intermediate_size": f.expert_ffn,
            "shared_expert_intermediate_size": f.count("expert_shared_feed_forward_length", 0, lo=0),
            "linear_num_key_heads": f.count("ssm.group_count"), "linear_num_value_heads": v_heads,
            "linear_key_head_dim": f.count("ssm.state_size"),
            "linear_value_head_dim": f.count("ssm.inner_size") // v_heads,
            "linear_conv_kernel_dim": f.count("ssm.conv_kernel"), "linear_value_heads_tiled": tiled,
            "partial_rotary_factor": f.count("rope.dimension_count", head_dim, limit="head_dim") / head_dim}


def gguf_config(f) -> dict:
    return {**hybrid_gguf_config(f, "qwen3_5_moe_text", tiled=True), "mlp_only_layers": []}


def gguf_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """Undo the converter: main norms are stored as 1 + w, the DeltaNet decay as A = -exp(A_log)."""
    if OFFSET_NORMS.match(name):
        return t.float() - 1.0
    if name.endswith(".ssm_a"):
        return torch.log(-t.float())
    return t


SPEC = FamilySpec(
    name="qwen3_5_moe", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=LINEAR_KINDS, layouts=LAYOUTS, gguf_arch="qwen35moe", gguf_norm_topk=True, gguf_config=gguf_config,
    gguf_names=GGUF_NAMES, gguf_tensor=gguf_tensor,
)
