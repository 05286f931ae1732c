"""GGUF metadata -> a Hugging Face style config dict, so each family's `model_args(config)` serves GGUF too.

The routing conventions that GGUF does not store come from llama.cpp's graph for each architecture
(llama-model.cpp): qwen3moe normalises the top-k weights, qwen2moe and olmoe do not, Mixtral (llama arch
with experts) takes softmax over the top-k logits.
"""
from __future__ import annotations

from moepage.paging.safetensors_file import CheckpointError

# GGUF general.architecture -> (HF model_type, norm_topk_prob when GGUF does not say)
ARCHITECTURES = {
    "qwen3moe": ("qwen3_moe", True),
    "qwen2moe": ("qwen2_moe", False),
    "llama": ("mixtral", True),
    "olmoe": ("olmoe", False),
}
FILE_TYPE_DTYPE = {0: "float32", 1: "float32", 32: "bfloat16"}  # general.file_type (LLAMA_FTYPE); others: bfloat16


def _get(meta: dict, key: str, path: str, default=None, required: bool = False):
    if key in meta:
        return meta[key]
    if required:
        raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
    return default


def _f32(value) -> float:
    """A float32 GGUF value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(f"{float(value):.7g}")


def gguf_config(meta: dict, tensor_names: set[str], vocab_size: int, path: str = "?") -> dict:
    """config.json-like dict for the GGUF file's architecture (model_type, sizes, rope, routing, token ids)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r}; moepage serves {', '.join(sorted(ARCHITECTURES))} "
            f"(llama only with experts, i.e. Mixtral)"
        )
    model_type, norm_default = ARCHITECTURES[arch]
    k = lambda key, default=None, required=False: _get(meta, f"{arch}.{key}", path, default, required)  # noqa: E731
    layers = int(k("block_count", required=True))
    hidden = int(k("embedding_length", required=True))
    heads = int(k("attention.head_count", required=True))
    experts = int(k("expert_count", 0) or 0)
    if experts == 0:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} without experts ({arch}.expert_count is 0 or "
                              f"missing): moepage serves Mixture-of-Experts models only")
    kv_heads = k("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        kv_heads = kv_heads[0]
    head_dim = int(k("attention.key_length") or k("rope.dimension_count") or hidden // heads)
    ffn = k("feed_forward_length", 0)
    ffn = int(ffn[0] if isinstance(ffn, list) else ffn or 0)
    expert_ffn = int(k("expert_feed_forward_length") or ffn)
    sparse = [f"blk.{i}.ffn_gate_inp.weight" in tensor_names for i in range(layers)]
    config = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(k("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(k("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(k("context_length", 4096)),
        "num_experts_per_tok": int(k("expert_used_count", required=True)),
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
            "rope_type": scaling_type, "factor": float(k("rope.scaling.factor", 1.0)),
            "original_max_position_embeddings": int(k("rope.scaling.original_context_length", 0) or 0),
        }
    if model_type == "mixtral":
        config.update(num_local_experts=experts, intermediate_size=expert_ffn)
    elif model_type == "olmoe":
        clip = k("attention.clamp_kqv")
        config.update(num_experts=experts, intermediate_size=expert_ffn, clip_qkv=float(clip) if clip else None,
                      attention_bias="blk.0.attn_q.bias" in tensor_names)
    else:
        config.update(num_experts=experts, moe_intermediate_size=expert_ffn, intermediate_size=ffn)
        if model_type == "qwen2_moe":
            config.update(shared_expert_intermediate_size=int(k("expert_shared_feed_forward_length", 0) or 0),
                          qkv_bias="blk.0.attn_q.bias" in tensor_names)
        else:
            config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return config
