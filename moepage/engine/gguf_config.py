"""GGUF metadata -> a Hugging Face style config dict, so each family's `model_args(config)` serves GGUF too.

The routing conventions that GGUF does not store come from llama.cpp's graph for each architecture
(llama-model.cpp), kept in each FamilySpec (gguf_norm_topk): qwen3moe normalises the top-k weights, qwen2moe and
olmoe do not, Mixtral (llama arch with experts) takes softmax over the top-k logits. The keys that only one family
has come from its FamilySpec.gguf_config(GGUFFields).
"""
from __future__ import annotations

from dataclasses import dataclass

from moepage.engine.families import GGUF_FAMILIES, family_for_gguf
from moepage.engine.model_args import LIMITS, REQUIRED, ConfigError, int_field
from moepage.paging.safetensors_file import CheckpointError, shown

FILE_TYPE_DTYPE = {0: "float32", 1: "float32", 32: "bfloat16"}  # general.file_type (LLAMA_FTYPE); others: bfloat16


def _get(meta: dict, key: str, path: str, default=None, required: bool = False):
    if key in meta:
        return meta[key]
    if required:
        raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
    return default


def _int(meta: dict, key: str, path: str, default, limit: str | None, lo: int) -> int:
    """A count from GGUF metadata (a per-layer list: its first entry), bounded like the config field `limit`."""
    value = meta.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    hi = LIMITS.get(limit, 1 << 20) if limit else 1 << 20
    try:
        return int_field({key: value}, key, default, lo=lo, hi=hi)
    except ConfigError as e:
        raise ConfigError(f"{path}: GGUF metadata {e}") from None


def _number(meta: dict, key: str, path: str, default):
    value = meta.get(key, default)
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return None if value is None else float(value)
    raise ConfigError(f"{path}: GGUF metadata {key} must be a number, not {type(value).__name__}")


def _f32(value) -> float:
    """A float32 GGUF value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(f"{float(value):.7g}")


@dataclass(frozen=True)
class GGUFFields:
    """A GGUF file's metadata under its architecture's prefix, read bounded (what a family's gguf_config gets)."""

    meta: dict
    arch: str
    path: str
    tensor_names: set[str]
    experts: int = 0  # {arch}.expert_count
    ffn: int = 0  # {arch}.feed_forward_length
    expert_ffn: int = 0  # {arch}.expert_feed_forward_length, else feed_forward_length

    def get(self, key: str, default=None, required: bool = False):
        return _get(self.meta, f"{self.arch}.{key}", self.path, default, required)

    def count(self, key: str, default=REQUIRED, limit: str | None = None, lo: int = 1) -> int:
        return _int(self.meta, f"{self.arch}.{key}", self.path, default, limit, lo)

    def number(self, key: str, default):
        return _number(self.meta, f"{self.arch}.{key}", self.path, default)

    def has(self, tensor: str) -> bool:
        return tensor in self.tensor_names


def gguf_config(meta: dict, tensor_names: set[str], vocab_size: int, path: str = "?") -> dict:
    """config.json-like dict for the GGUF file's architecture (model_type, sizes, rope, routing, token ids)."""
    arch = meta.get("general.architecture")
    spec = family_for_gguf(arch)
    if spec is None:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {shown(arch)}; moepage serves {', '.join(sorted(GGUF_FAMILIES))} "
            f"(llama only with experts, i.e. Mixtral)"
        )
    model_type, norm_default = spec.model_types[0], spec.gguf_norm_topk
    k = lambda key, default=None, required=False: _get(meta, f"{arch}.{key}", path, default, required)  # noqa: E731
    n = lambda key, default=REQUIRED, limit=None, lo=1: _int(meta, f"{arch}.{key}", path, default, limit, lo)  # noqa: E731
    layers = n("block_count", limit="num_hidden_layers")
    hidden = n("embedding_length", limit="hidden_size")
    heads = n("attention.head_count", limit="num_attention_heads")
    experts = n("expert_count", 0, "num_experts", lo=0)
    if experts == 0:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} without experts ({arch}.expert_count is 0 or "
                              f"missing): moepage serves Mixture-of-Experts models only")
    kv_heads = n("attention.head_count_kv", heads, "num_key_value_heads")
    head_dim = n("attention.key_length", 0, "head_dim", lo=0) or n("rope.dimension_count", 0, "head_dim", lo=0)
    head_dim = head_dim or hidden // heads
    ffn = n("feed_forward_length", 0, lo=0)
    expert_ffn = n("expert_feed_forward_length", 0, lo=0) or ffn
    sparse = [f"blk.{i}.ffn_gate_inp.weight" in tensor_names for i in range(layers)]
    config = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_number(meta, f"{arch}.attention.layer_norm_rms_epsilon", path, 1e-6)),
        "rope_theta": _f32(_number(meta, f"{arch}.rope.freq_base", path, 10000.0)),
        "max_position_embeddings": n("context_length", 4096, "max_position_embeddings"),
        "num_experts_per_tok": n("expert_used_count", limit="num_experts"),
        "norm_topk_prob": bool(k("expert_weights_norm", norm_default)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "mlp_only_layers": [i for i, s in enumerate(sparse) if not s],
        "decoder_sparse_step": 1,
        "dtype": FILE_TYPE_DTYPE.get(meta.get("general.file_type"), "bfloat16"),
        "gguf_architecture": arch,
    }
    scaling_type = k("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        config["rope_scaling"] = {
            "rope_type": scaling_type, "factor": _number(meta, f"{arch}.rope.scaling.factor", path, 1.0),
            "original_max_position_embeddings": n("rope.scaling.original_context_length", 0, "max_position_embeddings",
                                                  lo=0),
        }
    config.update(spec.gguf_config(GGUFFields(meta, arch, path, tensor_names, experts, ffn, expert_ffn)))
    return config
