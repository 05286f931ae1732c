"""Qwen3-Next (Qwen3-Next-80B-A3B, Qwen3-Coder-Next): Qwen3.5's mixers and norms, text-only, the DeltaNet
projections fused per key head (in_proj_qkvz, in_proj_ba), dense layers by decoder_sparse_step / mlp_only_layers.

llama.cpp's converter (arch qwen3next) splits in_proj_qkvz into attn_qkv (q | k | v of all heads) and attn_gate (z),
keeps in_proj_ba as ssm_ba and leaves the value heads in their published order (no tiling, unlike qwen35moe).
"""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.families.qwen3_5_moe import (
    GGUF_NAMES as QWEN35_GGUF_NAMES, LINEAR_KINDS, gguf_tensor, hybrid_fields, hybrid_gguf_config,
    linear_attention_names,
)
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import (
    ModelArgs, bool_field, common_args, int_field, sparse_layer_flags,
)
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("qwen3_next",)
GGUF_ARCH = "qwen3next"
NAMES = {**common.ATTENTION, **common.QWEN_MLP, **linear_attention_names("qwen3_next")}
EXPERT_NAMES = common.QWEN_EXPERTS
GGUF_NAMES = {**{k: v for k, v in QWEN35_GGUF_NAMES.items() if not k.endswith(("in_proj_b", "in_proj_a"))},
              "layers.{L}.linear_attn.in_proj_ba": "blk.{L}.ssm_ba.weight"}


def model_args(config: dict) -> ModelArgs:
    layout = "qwen3_next_gguf" if config.get("gguf_architecture") == GGUF_ARCH else "qwen3_next"
    fields = hybrid_fields(config, layout)
    return common_args(
        config, "qwen3_next",
        routing=RoutingConfig(top_k=int_field(config, "num_experts_per_tok"),
                              norm_topk_prob=bool_field(config, "norm_topk_prob", True)),
        intermediate_size=int_field(config, "intermediate_size", 0, lo=0),
        sparse_layers=sparse_layer_flags(config, int_field(config, "num_hidden_layers"), fields["num_experts"]),
        **fields,
    )


def gguf_config(f) -> dict:
    """The qwen3next keys; mlp_only_layers come from the generic reader (layers without ffn_gate_inp)."""
    return {**hybrid_gguf_config(f, "qwen3_next", tiled=False), "intermediate_size": f.ffn}


SPEC = FamilySpec(
    name="qwen3_next", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=LINEAR_KINDS, gguf_arch=GGUF_ARCH, gguf_norm_topk=True, gguf_norm_topk_fixed=True,
    gguf_config=gguf_config, gguf_names=GGUF_NAMES, gguf_tensor=gguf_tensor,
)
