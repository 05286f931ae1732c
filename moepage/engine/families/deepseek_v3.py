"""DeepSeek-V3 / V3.1 and Kimi K2 (deepseek_v3, kimi_k2; GGUF deepseek2): multi-head latent attention
(attention/mla.py) in every layer, the sigmoid + correction-bias group-limited router, shared experts, dense first
layers (first_k_dense_replace). The checkpoints' MTP layer (model.layers.{num_hidden_layers}) is never named, so
never read. `mla_family_fields` is what every MLA family (deepseek_v2, glm4_moe_lite, kimi_k25) reads the same way."""
from __future__ import annotations

from moepage.engine.attention.mla import MLAShape, checkpoint_names
from moepage.engine.families import common
from moepage.engine.families.sigmoid_moe import (
    SHARED_EXPERTS, dense_first_layers, shared_expert_size, sigmoid_routing,
)
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import (
    ConfigError, ModelArgs, bool_field, common_args, experts_field, float_field, int_field, rope_from_config,
)

MODEL_TYPES = ("deepseek_v3", "kimi_k2")
NAMES = {**{n: common.ATTENTION[n] for n in ("embed", "norm", "lm_head", "layers.{L}.attn_norm",
                                             "layers.{L}.ffn_norm")},
         **checkpoint_names(), **{n: common.QWEN_MLP[n] for n in ("layers.{L}.router", "layers.{L}.dense_gate",
                                                                  "layers.{L}.dense_up", "layers.{L}.dense_down")},
         **SHARED_EXPERTS}
EXPERT_NAMES = common.QWEN_EXPERTS


def mla_family_fields(config: dict, rope_layout: str) -> dict:
    """The ModelArgs fields of an MLA decoder: every layer "mla", head_dim the rope key's width (the RoPE table's),
    the experts, shared experts and dense first layers."""
    layers = int_field(config, "num_hidden_layers")
    experts = experts_field(config, "n_routed_experts", "num_local_experts")
    moe_width = int_field(config, "moe_intermediate_size", lo=0)
    _, scaling = rope_from_config(config)
    params = config.get("rope_parameters")
    factor = float_field(params if isinstance(params, dict) and "partial_rotary_factor" in params else config,
                         "partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise ConfigError(f"partial_rotary_factor {factor}: MLA ropes the whole qk_rope_head_dim key (1.0)")
    shape = MLAShape.from_config(config, scaling, rope_layout)
    return dict(
        head_dim=shape.qk_rope_head_dim,
        layer_types=["mla"] * layers,
        mla=shape.as_dict(),
        num_experts=experts,
        moe_intermediate_size=moe_width,
        intermediate_size=int_field(config, "intermediate_size", 0, lo=0),
        shared_expert_intermediate_size=shared_expert_size(config, moe_width),
        sparse_layers=dense_first_layers(config, layers, experts),
    )


def rope_layout(config: dict) -> str:
    return "interleave" if bool_field(config, "rope_interleave", True) else "half"


def check_scoring(config: dict, want: str) -> None:
    """The original DeepSeek config.json names its router's score function (transformers ignores it)."""
    got = config.get("scoring_func", want)
    if got != want:
        raise ConfigError(f"scoring_func {got!r}: this family routes with {want}")


def model_args(config: dict, family: str = "deepseek_v3") -> ModelArgs:
    check_scoring(config, "sigmoid")
    fields = mla_family_fields(config, rope_layout(config))
    return common_args(config, family, routing=sigmoid_routing(config, fields["num_experts"]),
                       router_correction_bias=fields["num_experts"] > 0, **fields)


SPEC = FamilySpec(
    name="deepseek_v3", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=("mla",),
)
