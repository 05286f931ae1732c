"""Mixtral: top-k over softmax then renormalised (same as top-k -> softmax), float32 routing weights."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.model_args import ModelArgs, common_args
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("mixtral",)
GGUF_ARCH = "llama"
DENSE_MODEL_TYPE = "mistral"
NAMES = {**common.ATTENTION, "layers.{L}.router": "model.layers.{L}.block_sparse_moe.gate.weight"}
EXPERT_NAMES = {
    "gate": "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
    "up": "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
    "down": "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
}


def model_args(config: dict) -> ModelArgs:
    return common_args(
        config, "mixtral",
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        num_experts=int(config["num_local_experts"]),
        moe_intermediate_size=int(config["intermediate_size"]),
        routing=RoutingConfig(
            top_k=int(config["num_experts_per_tok"]), norm_topk_prob=True, weights_in_logits_dtype=False
        ),
        sliding_window=config.get("sliding_window"),
    )
