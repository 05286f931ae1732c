"""GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's decoder (multi-head latent attention, the sigmoid + correction-bias
router, one shared expert) with the dense layers listed in mlp_layer_types (default: the first)."""
from __future__ import annotations

from moepage.engine.families.deepseek_v3 import EXPERT_NAMES, NAMES, mla_family_fields, rope_layout
from moepage.engine.families.sigmoid_moe import sigmoid_routing
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import ModelArgs, common_args, int_field

MODEL_TYPES = ("glm4_moe_lite",)


def model_args(config: dict) -> ModelArgs:
    if config.get("mlp_layer_types") is None:  # transformers' default: the first layer dense
        config = {**config, "mlp_layer_types": ["dense"] + ["sparse"] * (int_field(config, "num_hidden_layers") - 1)}
    fields = mla_family_fields(config, rope_layout(config))
    return common_args(config, "glm4_moe_lite", routing=sigmoid_routing(config, fields["num_experts"]),
                       router_correction_bias=fields["num_experts"] > 0, **fields)


SPEC = FamilySpec(
    name="glm4_moe_lite", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=("mla",),
)
