"""gpt-oss (gpt-oss-20b / 120b): GQA with q/k/v/o biases and learned per-head sinks, sliding-window (128) and full
layers alternating by layer_types, YaRN RoPE, a router with a bias (top-k of the logits, then softmax over the k),
experts with biases around a clamped SwiGLU, gate and up interleaved, stored fused per layer (float, or MXFP4 as
published: paging/fused_experts.py); no shared expert. The chat format is Harmony (server/harmony.py).
"""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import ConfigError, ModelArgs, common_args, experts_field, float_field, int_field
from moepage.kernels.routing import RoutingConfig
from moepage.paging.fused_experts import FusedExpertSource
from moepage.paging.gguf_biased_experts import BiasedGGUFExpertSource

MODEL_TYPES = ("gpt_oss",)
KINDS = ("sliding_attention", "full_attention")
NAMES = {
    **{k: v for k, v in common.ATTENTION.items() if not k.endswith(("q_norm", "k_norm"))},
    "layers.{L}.sinks": "model.layers.{L}.self_attn.sinks",
    "layers.{L}.router": "model.layers.{L}.mlp.router.weight",
    "layers.{L}.router_bias": "model.layers.{L}.mlp.router.bias",
}
EXPERT_NAMES = {"fused": "model.layers.{L}.mlp.experts."}  # the prefix of each layer's fused expert tensors
QUANT_METHODS = (None, "mxfp4")
GGUF_NAMES = {
    **{k: v for k, v in common.GGUF.items() if not k.endswith(("q_norm", "k_norm"))},
    "layers.{L}.ffn_norm": "blk.{L}.post_attention_norm.weight",
    "layers.{L}.sinks": "blk.{L}.attn_sinks.weight",
    "layers.{L}.router_bias": "blk.{L}.ffn_gate_inp.bias",
}


def layer_types(config: dict, layers: int) -> list[str]:
    types = config.get("layer_types")
    if types is None:  # older configs: sliding first, alternating
        return [KINDS[i % 2] for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or not all(t in KINDS for t in types):
        raise ConfigError(f"layer_types must list {layers} entries, each one of {', '.join(KINDS)}")
    return list(types)


def model_args(config: dict) -> ModelArgs:
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    if method not in QUANT_METHODS:
        raise ConfigError(f"quantization_config.quant_method {method!r} is not one moepage reads (mxfp4)")
    layers = int_field(config, "num_hidden_layers")
    experts = experts_field(config, "num_local_experts")
    window = int_field(config, "sliding_window", 128)
    args = common_args(
        config, "gpt_oss",
        num_experts=experts,
        moe_intermediate_size=int_field(config, "intermediate_size"),
        routing=RoutingConfig(top_k=int_field(config, "num_experts_per_tok"), scoring="topk_softmax"),
        qkv_bias=bool(config.get("attention_bias", True)),
        o_bias=bool(config.get("attention_bias", True)),
        layer_types=layer_types(config, layers),
        attn_sinks=True,
        norm_float_weight=True,
        sliding_attention_window=window,
        router_bias=True,
        swiglu_limit=float_field(config, "swiglu_limit", 7.0),
        swiglu_alpha=float_field(config, "swiglu_alpha", 1.702),
    )
    if not args.qkv_bias:
        raise ConfigError("attention_bias false: gpt-oss checkpoints have q/k/v/o biases")
    return args


def gguf_config(f) -> dict:
    """llama.cpp's gpt-oss graph: sliding-window layers first, then alternating (its SWA pattern 2), q/k/v/o biases,
    the clamped SwiGLU's constants fixed (1.702, 7.0); YaRN's correction range rounded outwards (ggml's
    rope_yarn_corr_dims floors and ceils it, where transformers' gpt-oss config says truncate false)."""
    layers = f.count("block_count", limit="num_hidden_layers")
    return {"num_local_experts": f.experts, "intermediate_size": f.expert_ffn,
            "sliding_window": f.count("attention.sliding_window", 128, limit="sliding_window"),
            "layer_types": [KINDS[i % 2] for i in range(layers)], "attention_bias": True}


SPEC = FamilySpec(
    name="gpt_oss", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=KINDS, expert_source=lambda index, names: FusedExpertSource(index, names["fused"]),
    gguf_arch="gpt-oss", gguf_config=gguf_config, gguf_names=GGUF_NAMES, gguf_expert_source=BiasedGGUFExpertSource,
)
