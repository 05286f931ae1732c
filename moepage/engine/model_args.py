"""ModelArgs: everything the runtime needs to know about a model family instance."""
from __future__ import annotations

from dataclasses import dataclass, field

from moepage.kernels.routing import RoutingConfig
from moepage.paging.pread import CheckpointError


@dataclass
class ModelArgs:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    num_experts: int
    moe_intermediate_size: int
    routing: RoutingConfig
    sparse_layers: list[bool]
    intermediate_size: int = 0  # dense layers (mlp_only_layers / decoder_sparse_step)
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    qk_norm: str | None = None  # "head" (Qwen3: per head) | "full" (OLMoE: over all heads)
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # the mixer of each layer (config.json layer_types: full_attention, linear_attention, ...); empty: all full
    layer_types: list[str] = field(default_factory=list)
    attn_output_gate: bool = False  # full attention: doubled q_proj, per head [q, gate], out * sigmoid(gate)
    partial_rotary_factor: float = 1.0  # RoPE on the first head_dim * factor dims of each head
    norm_unit_offset: bool = False  # RMSNorms compute h * (1 + w) in float32 (Qwen3.5, Qwen3-Next)
    norm_float_weight: bool = False  # RMSNorms compute w * h in float32, rounded once (gpt-oss)
    linear_attention: dict | None = None  # the Gated DeltaNet layers' sizes (GatedDeltaShape fields)
    # gpt-oss: learned per-head attention sinks, the window of its "sliding_attention" layers (sliding_window above
    # windows every layer, as Mixtral's), a router bias, experts with biases around a clamped SwiGLU
    attn_sinks: bool = False
    sliding_attention_window: int | None = None
    router_bias: bool = False
    # multi-head latent attention sizes (attention/mla.py MLAShape fields: kv_lora_rank, q_lora_rank, ...)
    mla: dict | None = None
    router_correction_bias: bool = False  # e_score_correction_bias [E] per MoE layer (sigmoid routers)
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # Gemma 4: each layer kind's attention shape (attention/gemma4.py), a family's own FFN half of every layer
    # (engine/layer_blocks.py; None: the shared FFN), the experts' activation ("silu" | "gelu_tanh"), the embedding
    # multiplier and tanh soft-capping of the logits (None: neither)
    attention_kinds: dict | None = None
    layer_block: str | None = None
    expert_activation: str = "silu"
    embed_scale: float | None = None
    final_logit_softcapping: float | None = None

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def mixers(self) -> list[str]:
        """The layer_types entry of every layer."""
        return self.layer_types or ["full_attention"] * self.num_layers

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.sparse_layers) if s]


class ConfigError(CheckpointError):
    """A model config (config.json, a split manifest's config, GGUF metadata) has a missing, mistyped or out-of-range
    field; the message names the field, and the loader puts the file in front."""


REQUIRED = object()
# Sane upper bounds on config sizes, far above any published model (checked before anything is sized by them).
LIMITS = {
    "num_hidden_layers": 1024, "hidden_size": 1 << 17, "num_attention_heads": 4096, "num_key_value_heads": 4096,
    "head_dim": 4096, "vocab_size": 1 << 24, "max_position_embeddings": 1 << 26, "sliding_window": 1 << 26,
    "num_experts": 1 << 16, "num_local_experts": 1 << 16,
}  # any other int field: at most 1 << 20 (intermediate sizes)


def int_field(config: dict, key: str, default=REQUIRED, lo: int = 1, hi: int | None = None) -> int:
    """config[key] as an int in [lo, hi] (hi: LIMITS by name); an integral float such as 1e3 counts."""
    value = config.get(key)
    if value is None:
        if default is REQUIRED:
            raise ConfigError(f"{key} is missing")
        return default
    hi = LIMITS.get(key, 1 << 20) if hi is None else hi
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        shown = value if abs(value) < 1 << 63 else "a huge number"
        raise ConfigError(f"{key} is {shown}, outside {lo}..{hi}")
    return value


def float_field(config: dict, key: str, default: float, lo: float = 0.0, positive: bool = True) -> float:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ConfigError(f"{key} must be a number, not {type(value).__name__}")
    if (positive and value <= lo) or abs(value) == float("inf"):
        raise ConfigError(f"{key} must be a finite number above {lo}")
    return float(value)


def bool_field(config: dict, key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, (bool, int)):
        raise ConfigError(f"{key} must be true or false, not {type(value).__name__}")
    return bool(value)


def rope_from_config(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers v5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`."""
    params = config.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be an object, not {type(params).__name__}")
    if params is not None and "rope_theta" in params:
        scaling = dict(params) if params.get("rope_type", "default") != "default" else None
        return float_field(params, "rope_theta", 10000.0), _rope_scaling(scaling, "rope_parameters")
    return float_field(config, "rope_theta", 10000.0), _rope_scaling(config.get("rope_scaling"), "rope_scaling")


def _rope_scaling(scaling, key: str) -> dict | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"{key} must be an object, not {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind is not None and not isinstance(kind, str):
        raise ConfigError(f"{key}.rope_type must be a string")
    float_field(scaling, "factor", 1.0)
    int_field(scaling, "original_max_position_embeddings", 0, lo=0, hi=LIMITS["max_position_embeddings"])
    for k in ("beta_fast", "beta_slow", "attention_factor"):
        float_field(scaling, k, 1.0)
    return scaling


def eos_list(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < LIMITS["vocab_size"] for v in values):
        raise ConfigError("eos_token_id must be a token id or a list of token ids")
    return list(values)


def sparse_layer_flags(config: dict, num_layers: int, num_experts: int) -> list[bool]:
    """Which layers are MoE, from `mlp_only_layers` and `decoder_sparse_step` (Qwen2/3-MoE)."""
    dense = config.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise ConfigError("mlp_only_layers must be a list of layer indices")
    step = int_field(config, "decoder_sparse_step", 1, hi=max(1, num_layers))
    dense = set(dense)
    return [(i not in dense) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]


def require(config: dict, *keys: str):
    """The first present key's value; a clear error naming all candidates otherwise."""
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    raise ConfigError(f"{' / '.join(keys)} is missing")


def experts_field(config: dict, *keys: str) -> int:
    """The routed expert count under the first of keys present (0: a dense config)."""
    key = next((k for k in keys if config.get(k) is not None), None)
    if key is None:
        raise ConfigError(f"{' / '.join(keys)} is missing")
    return int_field(config, key, lo=0)


def common_args(config: dict, family: str, **family_fields) -> ModelArgs:
    """The fields every supported family reads the same way from config.json, plus the family's own (which the
    family reads with int_field & co. too)."""
    if not isinstance(config, dict):
        raise ConfigError(f"the config must be a JSON object, not {type(config).__name__}")
    layers = int_field(config, "num_hidden_layers")
    heads = int_field(config, "num_attention_heads")
    hidden = int_field(config, "hidden_size")
    kv_heads = int_field(config, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    theta, scaling = rope_from_config(config)
    window = int_field(config, "sliding_window", None) if config.get("use_sliding_window") else None
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    bos = config.get("bos_token_id")
    if bos is not None and eos_list(bos) != [bos]:
        raise ConfigError("bos_token_id must be a token id")
    fields = dict(
        family=family,
        vocab_size=int_field(config, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int_field(config, "head_dim", hidden // heads),
        rms_norm_eps=float_field(config, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int_field(config, "max_position_embeddings", 32768),
        sparse_layers=[True] * layers,
        sliding_window=window,
        tie_word_embeddings=bool_field(config, "tie_word_embeddings", False),
        torch_dtype=str(dtype) if isinstance(dtype, str) else "float32",
        bos_token_id=bos,
        eos_token_ids=eos_list(config.get("eos_token_id")),
    )
    fields.update(family_fields)
    args = ModelArgs(**fields)
    check_args(args)
    return args


def check_args(args: ModelArgs):
    """Cross-field checks: what the families computed must be a model moepage can run."""
    if args.head_dim < 1 or args.head_dim % 2:
        raise ConfigError(f"head_dim {args.head_dim} must be a positive even number (rotary pairs)")
    if len(args.sparse_layers) != args.num_layers:
        raise ConfigError("the MoE layer pattern does not cover num_hidden_layers")
    if args.num_experts and not 1 <= args.top_k <= args.num_experts:
        raise ConfigError(f"num_experts_per_tok {args.top_k} must be between 1 and the number of experts "
                          f"({args.num_experts})")
    if args.moe_layers and args.moe_intermediate_size < 1:
        raise ConfigError("the routed experts' intermediate size must be at least 1")
    if not all(args.sparse_layers) and args.intermediate_size < 1:
        raise ConfigError("intermediate_size must be at least 1 for the dense (mlp_only) layers")
    if args.layer_types and len(args.layer_types) != args.num_layers:
        raise ConfigError(f"layer_types has {len(args.layer_types)} entries for {args.num_layers} layers")
    if not 2 <= args.rotary_dim <= args.head_dim or args.rotary_dim % 2:
        raise ConfigError(f"partial_rotary_factor {args.partial_rotary_factor} gives {args.rotary_dim} rotary dims "
                          f"of a {args.head_dim}-dim head (an even number from 2 to the head dim)")


def resident_shape(args: ModelArgs, canonical: str) -> tuple[int, ...]:
    """The shape (torch order) the config implies for a resident weight ('embed', 'layers.3.k', ...)."""
    from moepage.engine.attention import mixer_class

    H, V = args.hidden_size, args.vocab_size
    F, S = args.intermediate_size, args.shared_expert_intermediate_size
    top = {"embed": (V, H), "lm_head": (V, H), "norm": (H,)}
    if canonical in top:
        return top[canonical]
    _, layer, name = canonical.split(".", 2)
    mixer = mixer_class(args.mixers[int(layer)]).weight_shapes(args, int(layer))
    if name in mixer:
        return mixer[name]
    if args.layer_block:
        from moepage.engine.layer_blocks import block_class

        block = block_class(args.layer_block).weight_shapes(args, int(layer))
        if name in block:
            return block[name]
    shapes = {
        "attn_norm": (H,), "ffn_norm": (H,),
        "router": (args.num_experts, H), "router_bias": (args.num_experts,),
        "router_correction_bias": (args.num_experts,), "dense_gate": (F, H), "dense_up": (F, H), "dense_down": (H, F),
        "shared_gate": (S, H), "shared_up": (S, H), "shared_down": (H, S), "shared_expert_gate": (1, H),
    }
    return shapes[name]


def expert_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """gate [I, H], up [I, H], down [H, I] of every routed expert."""
    H, I = args.hidden_size, args.moe_intermediate_size
    return {"gate": (I, H), "up": (I, H), "down": (H, I)}
