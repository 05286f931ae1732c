"""Qwen3-Next (Qwen3-Next-80B-A3B, Qwen3-Coder-Next): Qwen3.5's mixers and norms, text-only, the DeltaNet
projections fused per key head (in_proj_qkvz, in_proj_ba), dense layers by decoder_sparse_step / mlp_only_layers."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.families.qwen3_5_moe import LINEAR_KINDS, hybrid_fields, linear_attention_names
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import (
    ModelArgs, bool_field, common_args, int_field, sparse_layer_flags,
)
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("qwen3_next",)
NAMES = {**common.ATTENTION, **common.QWEN_MLP, **linear_attention_names("qwen3_next")}
EXPERT_NAMES = common.QWEN_EXPERTS


def model_args(config: dict) -> ModelArgs:
    fields = hybrid_fields(config, "qwen3_next")
    return common_args(
        config, "qwen3_next",
        routing=RoutingConfig(top_k=int_field(config, "num_experts_per_tok"),
                              norm_topk_prob=bool_field(config, "norm_topk_prob", True)),
        intermediate_size=int_field(config, "intermediate_size", 0, lo=0),
        sparse_layers=sparse_layer_flags(config, int_field(config, "num_hidden_layers"), fields["num_experts"]),
        **fields,
    )


SPEC = FamilySpec(
    name="qwen3_next", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=LINEAR_KINDS,
)
