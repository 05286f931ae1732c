"""Mixtral: top-k over softmax then renormalised (same as top-k -> softmax), float32 routing weights."""
from __future__ import annotations

from moepage.engine.families import common
from moepage.engine.families.spec import FamilySpec
from moepage.engine.model_args import ModelArgs, common_args, experts_field, float_field, int_field
from moepage.kernels.routing import RoutingConfig

MODEL_TYPES = ("mixtral",)
NAMES = {**common.ATTENTION, "layers.{L}.router": "model.layers.{L}.block_sparse_moe.gate.weight"}
EXPERT_NAMES = {
    "gate": "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
    "up": "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
    "down": "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
}


def model_args(config: dict) -> ModelArgs:
    return common_args(
        config, "mixtral",
        rms_norm_eps=float_field(config, "rms_norm_eps", 1e-5),
        num_experts=experts_field(config, "num_local_experts"),
        moe_intermediate_size=int_field(config, "intermediate_size", lo=0),
        routing=RoutingConfig(
            top_k=int_field(config, "num_experts_per_tok"), norm_topk_prob=True, weights_in_logits_dtype=False
        ),
        sliding_window=int_field(config, "sliding_window", None),
    )


def gguf_config(f) -> dict:
    return {"num_local_experts": f.experts, "intermediate_size": f.expert_ffn}


SPEC = FamilySpec(
    name="mixtral", model_types=MODEL_TYPES, model_args=model_args, names=NAMES, expert_names=EXPERT_NAMES,
    dense_model_type="mistral", gguf_arch="llama", gguf_norm_topk=True, gguf_config=gguf_config,
)
