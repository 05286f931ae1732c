"""A fresh, randomly initialised dense Qwen2/Qwen3 model (the starting point of the demo pipeline).

Shape legend: V vocab, H hidden, N query heads, G kv heads, D head dim, I intermediate size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from moepage.surgery.trainable_model import TrainableDecoder, checkpoint_names, model_args_for


@dataclass(frozen=True)
class DenseSpec:
    model_type: str = "qwen2"  # qwen2 | qwen3
    vocab_size: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    max_position: int = 2048
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02
    seed: int = 0


def dense_config(spec: DenseSpec, eos_token_id: int | None = None) -> dict:
    if spec.model_type not in ("qwen2", "qwen3"):
        raise ValueError(f"model_type must be qwen2 or qwen3, got {spec.model_type!r}")
    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise ValueError("hidden must divide by heads and heads by kv_heads")
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[spec.model_type]
    config = {
        "architectures": [arch], "model_type": spec.model_type, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden, "intermediate_size": spec.intermediate, "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": spec.max_position, "rope_theta": spec.rope_theta, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": spec.tie_word_embeddings, "use_sliding_window": False,
        "bos_token_id": None, "eos_token_id": eos_token_id, "torch_dtype": "float32", "dtype": "float32",
        "moepage_dense_spec": asdict(spec),
    }
    if spec.model_type == "qwen3":
        config["head_dim"] = spec.hidden // spec.heads
        config["attention_bias"] = False
    return config


def init_dense(spec: DenseSpec, eos_token_id: int | None = None) -> TrainableDecoder:
    """GPT-2 style init: N(0, std) matrices, output projections scaled by 1/sqrt(2 * layers), ones for norms."""
    config = dense_config(spec, eos_token_id)
    args = model_args_for(config)
    g = torch.Generator().manual_seed(spec.seed)
    residual_scale = 1.0 / math.sqrt(2 * spec.layers)
    tensors = {}
    for canonical in checkpoint_names(config, args):
        leaf = canonical.split(".")[-1]
        if leaf.endswith("norm"):
            shape = (args.head_dim,) if leaf in ("q_norm", "k_norm") else (spec.hidden,)
            tensors[canonical] = torch.ones(shape)
            continue
        if leaf.endswith("_bias"):
            rows = {"q_bias": args.num_heads, "k_bias": args.num_kv_heads, "v_bias": args.num_kv_heads}[leaf]
            tensors[canonical] = torch.zeros(rows * args.head_dim)
            continue
        shape = _shape(leaf, args, spec)
        scale = residual_scale if leaf in ("o", "dense_down") else 1.0
        tensors[canonical] = torch.randn(*shape, generator=g) * spec.init_std * scale
    return TrainableDecoder(config, tensors)


def _shape(leaf: str, args, spec: DenseSpec) -> tuple[int, int]:
    H, D = spec.hidden, args.head_dim
    shapes = {
        "embed": (spec.vocab_size, H), "lm_head": (spec.vocab_size, H),
        "q": (args.num_heads * D, H), "k": (args.num_kv_heads * D, H), "v": (args.num_kv_heads * D, H),
        "o": (H, args.num_heads * D),
        "dense_gate": (spec.intermediate, H), "dense_up": (spec.intermediate, H), "dense_down": (H, spec.intermediate),
    }
    if leaf not in shapes:
        raise ValueError(f"no initialiser for {leaf!r}")
    return shapes[leaf]
