"""Gemma 4's feed-forward half of a decoder layer (the layer block "gemma4", engine/layer_blocks.py): a dense
GELU-tanh MLP and the routed experts side by side on the same residual, each with its own norms, summed, normed, added
to the residual, and the whole residual multiplied by the layer's learned scalar. transformers'
Gemma4TextDecoderLayer, in its order and dtypes:

    dense   = post_dense_norm(mlp(ffn_norm(h)))
    logits  = router(unscaled_norm(h) * router_scale * H^-0.5)           softmax -> top-k -> renormalise
    experts = post_experts_norm(sum_k w_k * per_expert_scale[e_k] * expert_e_k(pre_experts_norm(h)))
    h       = (h + post_ffn_norm(dense + experts)) * layer_scalar

Shape legend: T tokens, H hidden, F dense intermediate size, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from moepage.engine.attention.gemma4 import unscaled_rms_norm
from moepage.engine.model_args import ModelArgs
from moepage.engine.moe import SparseMoE
from moepage.engine.router import Router
from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.norm import rms_norm_float_weight
from moepage.paging.cache import ExpertCache

NORMS = ("post_dense_norm", "pre_experts_norm", "post_experts_norm", "post_ffn_norm")


@dataclass(frozen=True, eq=False)
class Gemma4Router(Router):
    """Gemma 4's router takes the residual: unscaled norm, x router.scale, x hidden^-0.5, then the projection (so
    pre-gating, which hands the previous layer's expert input to this router, gets the same normalisation)."""

    input_scale: torch.Tensor | None = None  # router.scale [H]
    eps: float = 1e-6

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] (the residual) -> router logits [T, E]."""
        r = unscaled_rms_norm(x, self.eps) * self.input_scale * self.input_scale.shape[0] ** -0.5
        return super().logits(r)


def gelu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [T, H] -> down(gelu_tanh(gate x) * up x) [T, H]."""
    return linear(F.gelu(linear(x, gate), approximate="tanh") * linear(x, up), down)


class Gemma4Block:
    kind: ClassVar[str] = "gemma4"

    def __init__(self, args: ModelArgs, layer: int, weights: dict[str, torch.Tensor], cache: ExpertCache):
        p = f"layers.{layer}."
        self.eps = args.rms_norm_eps
        self.ffn_norm = weights[p + "ffn_norm"]
        self.dense = tuple(weights[p + n] for n in ("dense_gate", "dense_up", "dense_down"))
        self.norms = {n: weights[p + n] for n in NORMS}
        self.layer_scalar = weights[p + "layer_scalar"]
        router = Gemma4Router(weights[p + "router"], args.routing, expert_scale=weights[p + "expert_scale"],
                              input_scale=weights[p + "router_scale"], eps=self.eps)
        self.moe = SparseMoE(layer, router, None, cache)

    @classmethod
    def weight_shapes(cls, args: ModelArgs, layer: int) -> dict[str, tuple[int, ...]]:
        """Resident weights beyond the layer's attn_norm, ffn_norm and mixer (names after `layers.{layer}.`)."""
        H, Fi, E = args.hidden_size, args.intermediate_size, args.num_experts
        return {"dense_gate": (Fi, H), "dense_up": (Fi, H), "dense_down": (H, Fi), "router": (E, H),
                "router_scale": (H,), "expert_scale": (E,), "layer_scalar": (1,), **{n: (H,) for n in NORMS}}

    @classmethod
    def build(cls, args: ModelArgs, layer: int, weights: dict[str, torch.Tensor], cache: ExpertCache):
        return cls(args, layer, weights, cache)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, H] (the residual after attention) -> the next layer's input [T, H]."""
        norm, n = rms_norm_float_weight, self.norms
        dense = norm(gelu_mlp(norm(h, self.ffn_norm, self.eps), *self.dense), n["post_dense_norm"], self.eps)
        experts = self.moe(norm(h, n["pre_experts_norm"], self.eps), logits=self.moe.gate.logits(h))
        experts = norm(experts, n["post_experts_norm"], self.eps)
        return (h + norm(dense + experts, n["post_ffn_norm"], self.eps)) * self.layer_scalar
