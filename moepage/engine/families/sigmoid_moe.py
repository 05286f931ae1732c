"""The config fields the DeepSeek-V3-style MoE families read the same way (GLM-4.5/4.6, DeepSeek-V2/V3, GLM-4.7-Flash,
Kimi K2): the sigmoid + correction-bias group-limited router, shared experts sized n_shared_experts x the routed
expert width, dense first layers (first_k_dense_replace, or an explicit mlp_layer_types list)."""
from __future__ import annotations

from moepage.engine.model_args import ConfigError, bool_field, float_field, int_field
from moepage.kernels.routing import RoutingConfig

SHARED_EXPERTS = {  # DeepSeek-V2/V3's and GLM-4.5's shared expert names (transformers: mlp.shared_experts)
    "layers.{L}.router_correction_bias": "model.layers.{L}.mlp.gate.e_score_correction_bias",
    "layers.{L}.shared_gate": "model.layers.{L}.mlp.shared_experts.gate_proj.weight",
    "layers.{L}.shared_up": "model.layers.{L}.mlp.shared_experts.up_proj.weight",
    "layers.{L}.shared_down": "model.layers.{L}.mlp.shared_experts.down_proj.weight",
}
GGUF_SHARED = {"layers.{L}.router_correction_bias": "blk.{L}.exp_probs_b.bias"}  # llama.cpp's name for the bias


def sigmoid_routing(config: dict, experts: int, norm_default: bool = True) -> RoutingConfig:
    """num_experts_per_tok, n_group / topk_group, norm_topk_prob, routed_scaling_factor: the routing of
    transformers' DeepseekV3TopkRouter (router logits in float32)."""
    groups = int_field(config, "n_group", 1, hi=max(1, experts))
    topk_group = int_field(config, "topk_group", 1, hi=groups)
    try:
        cfg = RoutingConfig(
            top_k=int_field(config, "num_experts_per_tok", hi=max(1, experts)), scoring="sigmoid_group_topk",
            norm_topk_prob=bool_field(config, "norm_topk_prob", norm_default), n_group=groups, topk_group=topk_group,
            routed_scaling_factor=float_field(config, "routed_scaling_factor", 1.0), logits_in_float32=True,
            weights_in_logits_dtype=True,
        )
        if experts:
            cfg.check_experts(experts)
    except ValueError as e:
        raise ConfigError(f"n_group / topk_group / num_experts_per_tok: {e}") from None
    return cfg


def dense_first_layers(config: dict, layers: int, experts: int) -> list[bool]:
    """Which layers are MoE: mlp_layer_types ("dense" | "sparse" per layer) when given, else every layer from
    first_k_dense_replace on."""
    types = config.get("mlp_layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers or not all(t in ("dense", "sparse") for t in types):
            raise ConfigError(f"mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} layers")
        return [t == "sparse" and experts > 0 for t in types]
    first = int_field(config, "first_k_dense_replace", 0, lo=0, hi=layers)
    return [i >= first and experts > 0 for i in range(layers)]


def shared_expert_size(config: dict, moe_intermediate: int) -> int:
    """The shared experts as one SwiGLU of n_shared_experts x moe_intermediate_size (transformers builds it so)."""
    return int_field(config, "n_shared_experts", 0, lo=0, hi=64) * moe_intermediate
