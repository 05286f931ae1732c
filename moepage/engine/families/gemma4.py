"""Gemma 4 MoE (gemma-4-26B-A4B): sliding-window and full attention layers by layer_types (5:1), each kind with its
own head width, kv heads and RoPE (attention/gemma4.py; attention_k_eq_v: the full layers' values are their keys'
projection), a dense GELU MLP and the routed GELU experts side by side in every layer (engine/gemma4_block.py; the
router normalises, scales, projects, softmax -> top-k -> renormalise, x per_expert_scale), Gemma's w * h RMSNorms in
float32, the embedding times sqrt(hidden), tanh soft-capped logits.

The published checkpoint is the multimodal wrapper (model_type gemma4: the text config under text_config, weights
under model.language_model.*; model.vision_tower.*, model.embed_vision.* and any audio tower are never read or
counted); gemma4_text keeps the text keys flat and the weights under model.*. Experts are stored stacked per layer
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]; paging/stacked_experts.py).
"""
from __future__ import annotations

from moepage.engine.attention.gemma4 import FULL, SLIDING
from moepage.engine.families import common
from moepage.engine.families.spec import FamilySpec, Layout
from moepage.engine.model_args import (
    ConfigError, ModelArgs, bool_field, common_args, experts_field, float_field, int_field,
)
from moepage.kernels.routing import RoutingConfig
from moepage.paging.gguf_stacked_experts import GGUFStackedExpertSource
from moepage.paging.stacked_experts import StackedExpertSource

MODEL_TYPES = ("gemma4", "gemma4_text")
LAYOUTS = {"gemma4": Layout(text_config="text_config", prefix="model.language_model.")}
KINDS = {"sliding_attention": SLIDING, "full_attention": FULL}
L = "model.layers.{L}."
NAMES = {
    **{k: v for k, v in common.ATTENTION.items() if "bias" not in k},
    "layers.{L}.ffn_norm": L + "pre_feedforward_layernorm.weight",
    "layers.{L}.out_norm": L + "post_attention_layernorm.weight",
    **{k: v for k, v in common.QWEN_MLP.items() if k.split(".")[-1] in ("dense_gate", "dense_up", "dense_down")},
    "layers.{L}.router": L + "router.proj.weight",
    "layers.{L}.router_scale": L + "router.scale",
    "layers.{L}.expert_scale": L + "router.per_expert_scale",
    "layers.{L}.post_dense_norm": L + "post_feedforward_layernorm_1.weight",
    "layers.{L}.pre_experts_norm": L + "pre_feedforward_layernorm_2.weight",
    "layers.{L}.post_experts_norm": L + "post_feedforward_layernorm_2.weight",
    "layers.{L}.post_ffn_norm": L + "post_feedforward_layernorm.weight",
    "layers.{L}.layer_scalar": L + "layer_scalar",
}
EXPERT_NAMES = {"stacked": L + "experts."}  # the prefix of each layer's stacked expert tensors


def refuse(config: dict, key: str, ok, what: str):
    if config.get(key) not in ok:
        raise ConfigError(f"{key} {config.get(key)!r}: {what}")


def layer_types(config: dict, layers: int) -> list[str]:
    """config.json layer_types (default: every 6th layer full), the last layer full as transformers forces it."""
    types = config.get("layer_types")
    if types is None:
        types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or not all(t in KINDS for t in types):
        raise ConfigError(f"layer_types must list {layers} entries, each one of {', '.join(KINDS)}")
    return [KINDS[t] for t in types[:-1]] + [FULL]


def rope_of(config: dict, kind: str) -> dict:
    """(theta, fraction of the pairs that turn, factor) of one layer kind's rope_parameters entry."""
    params = config.get("rope_parameters")
    entry = params.get(kind) if isinstance(params, dict) else None
    defaults = {"sliding_attention": ("default", 10_000.0, 1.0), "full_attention": ("proportional", 1e6, 0.25)}[kind]
    if entry is None:
        entry = dict(zip(("rope_type", "rope_theta", "partial_rotary_factor"), defaults))
    if not isinstance(entry, dict):
        raise ConfigError(f"rope_parameters.{kind} must be an object")
    rope_type = entry.get("rope_type", "default")
    if rope_type not in ("default", "proportional"):
        raise ConfigError(f"rope_parameters.{kind}.rope_type {rope_type!r}: moepage reads default and proportional")
    fraction = float_field(entry, "partial_rotary_factor", 1.0) if rope_type == "proportional" else 1.0
    if fraction > 1:
        raise ConfigError(f"rope_parameters.{kind}.partial_rotary_factor {fraction} must be at most 1")
    return {"rope_theta": float_field(entry, "rope_theta", defaults[1]), "rope_fraction": fraction,
            "rope_factor": float_field(entry, "factor", 1.0) if rope_type == "proportional" else 1.0}


def full_shape(config: dict, types: list[str], heads: int) -> tuple[int, int]:
    """(head dim, kv heads) of the full layers: per_layer_config (what transformers saves) or global_head_dim and,
    with attention_k_eq_v, num_global_key_value_heads; every full layer alike (one KV cache shape)."""
    kv = int_field(config, "num_key_value_heads", heads)
    if bool_field(config, "attention_k_eq_v", False):
        kv = int_field(config, "num_global_key_value_heads", kv)
    default = (int_field(config, "global_head_dim", 512, hi=4096), kv)
    per = config.get("per_layer_config")
    if per is None:
        return default
    if not isinstance(per, dict):
        raise ConfigError("per_layer_config must map layer indices to head_dim / num_key_value_heads")
    shapes = set()
    for i, t in enumerate(types):
        entry = per.get(str(i), per.get(i))
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"per_layer_config.{i} must be an object")
        if t == FULL:
            e = entry or {}
            shapes.add((int_field(e, "head_dim", default[0], hi=4096), int_field(e, "num_key_value_heads", kv)))
        elif entry:
            raise ConfigError(f"per_layer_config.{i}: moepage reads per-layer shapes of the full layers only")
    if len(shapes) != 1:
        raise ConfigError("per_layer_config: every full_attention layer must have the same head_dim and kv heads")
    return shapes.pop()


def model_args(config: dict) -> ModelArgs:
    if not bool_field(config, "enable_moe_block", False):
        raise ConfigError("enable_moe_block is false: a dense Gemma 4 (moepage serves the MoE models)")
    refuse(config, "hidden_size_per_layer_input", (None, 0), "per-layer embeddings are not read by moepage")
    refuse(config, "num_kv_shared_layers", (None, 0), "shared-KV layers are not read by moepage")
    refuse(config, "attention_bias", (None, False), "Gemma 4 MoE attention has no biases")
    refuse(config, "use_bidirectional_attention", (None, "vision"), "moepage runs causal text attention")
    refuse(config, "hidden_activation", (None, "gelu_pytorch_tanh"), "moepage runs GELU-tanh Gemma 4 MLPs")
    layers = int_field(config, "num_hidden_layers")
    heads = int_field(config, "num_attention_heads")
    hidden = int_field(config, "hidden_size")
    types = layer_types(config, layers)
    window = int_field(config, "sliding_window", 512, lo=2)
    head_dim = int_field(config, "head_dim", 256)
    kv = int_field(config, "num_key_value_heads", heads)
    full_dim, full_kv = full_shape(config, types, heads)
    for g in (kv, full_kv):
        if heads % g:
            raise ConfigError(f"num_attention_heads {heads} is not a multiple of the {g} kv heads")
    for d in (head_dim, full_dim):
        if d % 2:
            raise ConfigError(f"head_dim {d} must be even (rotary pairs)")
    k_eq_v = bool_field(config, "attention_k_eq_v", False)
    kinds = {SLIDING: {"head_dim": head_dim, "kv_heads": kv, "k_eq_v": False, "window": window,
                       **rope_of(config, "sliding_attention")},
             FULL: {"head_dim": full_dim, "kv_heads": full_kv, "k_eq_v": k_eq_v, **rope_of(config, "full_attention")}}
    if bool_field(config, "rope_freq_factors", False):  # a GGUF's rope_freqs tensor (gguf_config)
        kinds[FULL]["freq_factors"] = True
    softcap = config.get("final_logit_softcapping")
    return common_args(
        config, "gemma4",
        num_experts=experts_field(config, "num_experts"),
        moe_intermediate_size=int_field(config, "moe_intermediate_size"),
        intermediate_size=int_field(config, "intermediate_size"),
        routing=RoutingConfig(top_k=int_field(config, "top_k_experts"), norm_topk_prob=True,
                              weights_in_logits_dtype=False),
        tie_word_embeddings=bool_field(config, "tie_word_embeddings", True),
        layer_types=types,
        norm_float_weight=True,
        sliding_attention_window=window,
        attention_kinds=kinds,
        layer_block="gemma4",
        expert_activation="gelu_tanh",
        embed_scale=hidden ** 0.5,
        final_logit_softcapping=None if softcap is None else float_field(config, "final_logit_softcapping", 0.0),
    )


B = "blk.{L}."
GGUF_NAMES = {
    **{k: v for k, v in common.GGUF.items() if "bias" not in k and "shared" not in k and k != "layers.{L}.router"},
    "layers.{L}.out_norm": B + "post_attention_norm.weight",
    "layers.{L}.rope_freqs": "rope_freqs.weight",  # one tensor, read by each full layer
    "layers.{L}.router": B + "ffn_gate_inp.weight",
    "layers.{L}.router_scale": B + "ffn_gate_inp.scale",
    "layers.{L}.expert_scale": B + "ffn_down_exps.scale",
    "layers.{L}.post_dense_norm": B + "post_ffw_norm_1.weight",
    "layers.{L}.pre_experts_norm": B + "pre_ffw_norm_2.weight",
    "layers.{L}.post_experts_norm": B + "post_ffw_norm_2.weight",
    "layers.{L}.post_ffn_norm": B + "post_ffw_norm.weight",
    "layers.{L}.layer_scalar": B + "layer_output_scale.weight",
}
GGUF_EXPERT_NAMES = {"gate_up": B + "ffn_gate_up_exps.weight", "down": B + "ffn_down_exps.weight"}


def gguf_config(f) -> dict:
    """A gemma4 GGUF (llama.cpp's converter: norms stored as they are, the full layers' proportional RoPE as
    rope_freqs factors of 1 and 1e30, which the full layers divide their frequencies by, as llama.cpp does)."""
    layers = f.count("block_count", limit="num_hidden_layers")
    swa = f.get("attention.sliding_window_pattern")
    if not isinstance(swa, list) or len(swa) != layers or not all(isinstance(x, bool) for x in swa):
        raise ConfigError(f"{f.arch}.attention.sliding_window_pattern must list {layers} true/false entries")
    kv = f.get("attention.head_count_kv")
    kv = kv if isinstance(kv, list) and len(kv) == layers else [f.count("attention.head_count_kv")] * layers
    full = [i for i, s in enumerate(swa) if not s]
    if not full:
        raise ConfigError(f"{f.arch}.attention.sliding_window_pattern has no full-attention layer")
    softcap = f.number("final_logit_softcapping", None)
    return {
        "model_type": "gemma4_text", "enable_moe_block": True, "num_experts": f.experts,
        "top_k_experts": f.count("expert_used_count", limit="num_experts"),
        "moe_intermediate_size": f.expert_ffn, "intermediate_size": f.ffn,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in swa],
        "sliding_window": f.count("attention.sliding_window", limit="sliding_window", lo=2),
        "head_dim": f.count("attention.key_length_swa", limit="head_dim"), "num_key_value_heads": kv[0],
        "global_head_dim": f.count("attention.key_length", limit="head_dim"),
        "num_global_key_value_heads": kv[full[0]],
        "attention_k_eq_v": not f.has(f"blk.{full[0]}.attn_v.weight"),
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": f.number("rope.freq_base_swa",
                                                                                               10_000.0)},
                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 1.0,
                                               "rope_theta": f.number("rope.freq_base", 1e6)}},
        "rope_freq_factors": f.has("rope_freqs.weight"),
        "final_logit_softcapping": softcap,
        "hidden_size_per_layer_input": f.count("embedding_length_per_layer_input", 0, lo=0),
        "num_kv_shared_layers": f.count("attention.shared_kv_layers", 0, lo=0),
    }


SPEC = FamilySpec(
    name="gemma4", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    mixers=(SLIDING, FULL), layouts=LAYOUTS,
    expert_source=lambda index, names: StackedExpertSource(index, names["stacked"]),
    gguf_arch="gemma4", gguf_norm_topk=True, gguf_config=gguf_config,
    gguf_names=GGUF_NAMES, gguf_expert_names=GGUF_EXPERT_NAMES, gguf_expert_source=GGUFStackedExpertSource,
)
