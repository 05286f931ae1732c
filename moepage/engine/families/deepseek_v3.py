"""DeepSeek-V3 / V3.1 and Kimi K2 (deepseek_v3, kimi_k2; GGUF deepseek2): multi-head latent attention
(attention/mla.py) in every layer, the sigmoid + correction-bias group-limited router, shared experts, dense first
layers (first_k_dense_replace). The checkpoints' MTP layer (model.layers.{num_hidden_layers}) is never named, so
never read. `mla_family_fields` is what every MLA family (deepseek_v2, glm4_moe_lite, kimi_k25) reads the same way."""
from __future__ import annotations

from moepage.engine.attention.mla import GGUF_SUFFIX, MLAShape, checkpoint_names
from moepage.engine.families import common
from moepage.engine.families.sigmoid_moe import (
    GGUF_SHARED, SHARED_EXPERTS, dense_first_layers, shared_expert_size, sigmoid_routing,
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
GGUF_NAMES = {**{n: common.GGUF[n] for n in ("embed", "norm", "lm_head", "layers.{L}.attn_norm", "layers.{L}.ffn_norm",
                                            "layers.{L}.router", "layers.{L}.dense_gate", "layers.{L}.dense_up",
                                            "layers.{L}.dense_down", "layers.{L}.shared_gate", "layers.{L}.shared_up",
                                            "layers.{L}.shared_down")},
              **checkpoint_names("blk.{L}.", GGUF_SUFFIX), **GGUF_SHARED}
SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID; absent or 1: softmax (DeepSeek-V2)


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


def gguf_config(f) -> dict:
    """config.json keys from a deepseek2 GGUF (llama.cpp's converter, for DeepSeek-V2/V2-Lite/V3 and Kimi K2 alike:
    the sigmoid gating function tells V3's router from V2's softmax one). kv_b_proj comes split as k_b / v_b, the
    rope pairs adjacent (llama.cpp's NORM rope: the checkpoints' interleaved layout), YaRN's mscale_all_dim from
    the log multiplier the converter writes as 0.1 * mscale_all_dim."""
    sigmoid = f.count("expert_gating_func", 1, lo=0) == SIGMOID_GATING
    rope = f.count("rope.dimension_count", limit="head_dim")
    groups = f.count("expert_group_count", 1)
    config = {
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2", "mla_split_kv_b": True,
        "kv_lora_rank": f.count("attention.kv_lora_rank"), "q_lora_rank": f.count("attention.q_lora_rank", 0, lo=0),
        "qk_rope_head_dim": rope, "qk_nope_head_dim": f.count("attention.key_length_mla", limit="head_dim") - rope,
        "v_head_dim": f.count("attention.value_length_mla", limit="head_dim"),
        "n_routed_experts": f.experts, "moe_intermediate_size": f.expert_ffn, "intermediate_size": f.ffn,
        "n_shared_experts": f.count("expert_shared_count", 0, lo=0),
        "first_k_dense_replace": f.count("leading_dense_block_count", 0, lo=0),
        "routed_scaling_factor": f.number("expert_weights_scale", 1.0), "n_group": groups,
        "topk_group": f.count("expert_group_used_count", 1), "rope_interleave": True,
        "topk_method": "group_limited_greedy" if groups > 1 else "greedy",
    }
    if f.get("rope.scaling.type") == "yarn":
        log_mul = f.number("rope.scaling.yarn_log_multiplier", 0.0)
        config["rope_scaling"] = {
            "rope_type": "yarn", "factor": f.number("rope.scaling.factor", 1.0),
            "original_max_position_embeddings": f.count("rope.scaling.original_context_length", 0, lo=0,
                                                        limit="max_position_embeddings"),
            "beta_fast": f.number("rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": f.number("rope.scaling.yarn_beta_slow", 1.0),
            "mscale": round(log_mul / 0.1, 6), "mscale_all_dim": round(log_mul / 0.1, 6)}
    return config


SPEC = FamilySpec(
    name="deepseek_v3", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=("mla",), gguf_arch="deepseek2", gguf_norm_topk=False, gguf_config=gguf_config, gguf_names=GGUF_NAMES,
)
