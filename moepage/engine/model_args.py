"""ModelArgs: everything the runtime needs to know about a model family instance."""
from __future__ import annotations

from dataclasses import dataclass, field

from moepage.kernels.routing import RoutingConfig


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

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.sparse_layers) if s]


def rope_from_config(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers v5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = dict(params) if params.get("rope_type", "default") != "default" else None
        return float(params["rope_theta"]), scaling
    scaling = config.get("rope_scaling")
    return float(config.get("rope_theta", 10000.0)), scaling


def eos_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def sparse_layer_flags(config: dict, num_layers: int, num_experts: int) -> list[bool]:
    """Which layers are MoE, from `mlp_only_layers` and `decoder_sparse_step` (Qwen2/3-MoE)."""
    dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step") or 1)
    return [(i not in dense) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]


def require(config: dict, *keys: str):
    """The first present key's value; a clear error naming all candidates otherwise."""
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    raise ValueError(f"config.json is missing {' / '.join(keys)}")


def common_args(config: dict, family: str, **family_fields) -> ModelArgs:
    """The fields every supported family reads the same way from config.json, plus the family's own."""
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    theta, scaling = rope_from_config(config)
    fields = dict(
        family=family,
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        sparse_layers=[True] * layers,
        sliding_window=config.get("sliding_window") if config.get("use_sliding_window") else None,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        torch_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_list(config.get("eos_token_id")),
    )
    fields.update(family_fields)
    return ModelArgs(**fields)
