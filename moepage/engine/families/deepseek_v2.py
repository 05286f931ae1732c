"""DeepSeek-V2 / V2-Lite / V2.5 (deepseek_v2; GGUF deepseek2): multi-head latent attention (its RoPE a complex
multiply in float32 on interleaved pairs), a softmax router with greedy or group-limited greedy top-k (the
groups' single best score picks topk_group groups), never renormalised (transformers' DeepseekV2TopkRouter ignores
norm_topk_prob), times routed_scaling_factor; shared experts, dense first layers (first_k_dense_replace)."""
from __future__ import annotations

from moepage.engine.families.deepseek_v3 import EXPERT_NAMES, GGUF_NAMES, check_scoring, mla_family_fields
from moepage.engine.families.deepseek_v3 import NAMES as V3_NAMES
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import ConfigError, ModelArgs, bool_field, common_args, float_field, int_field
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("deepseek_v2",)
NAMES = {n: v for n, v in V3_NAMES.items() if not n.endswith("router_correction_bias")}
TOPK_METHODS = ("greedy", "group_limited_greedy")


def routing(config: dict, experts: int) -> RoutingConfig:
    method = config.get("topk_method") or "greedy"
    if method not in TOPK_METHODS:
        raise ConfigError(f"topk_method {method!r}: deepseek_v2 routes with {' or '.join(TOPK_METHODS)}")
    groups = int_field(config, "n_group", 1, hi=max(1, experts)) if method == "group_limited_greedy" else 1
    try:
        cfg = RoutingConfig(top_k=int_field(config, "num_experts_per_tok", hi=max(1, experts)),
                            scoring="softmax_group_greedy", n_group=groups,
                            topk_group=int_field(config, "topk_group", 1, hi=groups) if groups > 1 else 1,
                            routed_scaling_factor=float_field(config, "routed_scaling_factor", 1.0),
                            logits_in_float32=True)
        if experts:
            cfg.check_experts(experts)
    except ValueError as e:
        raise ConfigError(f"n_group / topk_group / num_experts_per_tok: {e}") from None
    return cfg


def model_args(config: dict) -> ModelArgs:
    check_scoring(config, "softmax")
    if bool_field(config, "mlp_bias", False):
        raise ConfigError("mlp_bias true: moepage's dense and shared SwiGLUs have no biases")
    fields = mla_family_fields(config, "complex")
    return common_args(config, "deepseek_v2", routing=routing(config, fields["num_experts"]), **fields)


SPEC = FamilySpec(
    name="deepseek_v2", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=("mla",), gguf_names={n: v for n, v in GGUF_NAMES.items() if not n.endswith("router_correction_bias")},
)
