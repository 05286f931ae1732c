"""The Gated DeltaNet token mixer (the `linear_attention` layers of Qwen3.5/3.6 MoE and Qwen3-Next) and its
per-sequence state: a causal conv state and a recurrent state instead of a KV cache.

Three weight layouts: qwen3_5_moe projects q|k|v, z, b, a with four matrices; qwen3_next fuses them into
in_proj_qkvz and in_proj_ba with each key head's q, k, v, z (and b, a) rows side by side; qwen3_next_gguf (llama.cpp's
qwen3next converter) splits in_proj_qkvz into q|k|v and z as qwen3_5_moe has them but keeps in_proj_ba fused.

Shape legend: T tokens, H hidden, C conv channels (2 Hk Dk + Hv Dv), W conv kernel width, Hk key heads,
Hv value heads, Dk key head dim, Dv value head dim, r = Hv / Hk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from moepage.engine.attention.base import MixerContext, TokenMixer
from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.gated_delta import causal_conv1d, chunk_gated_delta_rule, gated_rms_norm, recurrent_step

LAYOUTS = ("qwen3_5_moe", "qwen3_next", "qwen3_next_gguf")
PROJECTIONS = {"qwen3_5_moe": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
               "qwen3_next": ("in_proj_qkvz", "in_proj_ba"),
               "qwen3_next_gguf": ("in_proj_qkv", "in_proj_z", "in_proj_ba")}
SHARED_WEIGHTS = ("conv1d", "dt_bias", "A_log", "norm", "out_proj")
# A weight's name in the checkpoint, after the decoder layer's prefix (model.layers.{L}. or
# model.language_model.layers.{L}.).
CHECKPOINT_SUFFIX = {**{n: f"linear_attn.{n}.weight" for n in PROJECTIONS["qwen3_5_moe"] + PROJECTIONS["qwen3_next"]
                        + ("conv1d", "norm", "out_proj")},
                     "dt_bias": "linear_attn.dt_bias", "A_log": "linear_attn.A_log"}


def resident_weight_names(layout: str) -> tuple[str, ...]:
    """The mixer's weights (all resident), by the names GatedDeltaNet takes them under."""
    if layout not in PROJECTIONS:
        raise ValueError(f"unknown Gated DeltaNet layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return PROJECTIONS[layout] + SHARED_WEIGHTS


@dataclass(frozen=True)
class GatedDeltaShape:
    hidden: int
    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int = 4
    rms_norm_eps: float = 1e-6
    chunk: int = 64  # the chunked rule's block length (transformers' chunk_size)
    # value head h reads key head h % Hk (llama.cpp's qwen35 GGUFs reorder the value heads so), not h // (Hv/Hk)
    tiled_value_heads: bool = False

    def __post_init__(self):
        for name in ("hidden", "num_k_heads", "num_v_heads", "k_head_dim", "v_head_dim", "conv_kernel", "chunk"):
            if not 1 <= getattr(self, name) <= 1 << 20:
                raise ValueError(f"Gated DeltaNet {name} must be between 1 and 2^20, got {getattr(self, name)}")
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"linear_num_value_heads {self.num_v_heads} is not a multiple of linear_num_key_heads "
                             f"{self.num_k_heads}")

    @classmethod
    def from_config(cls, config: dict) -> "GatedDeltaShape":
        """From a text config.json (qwen3_5_moe_text or qwen3_next)."""
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act {config.get('hidden_act')!r}: Gated DeltaNet layers need silu")
        try:
            return cls(hidden=int(config["hidden_size"]), num_k_heads=int(config["linear_num_key_heads"]),
                       num_v_heads=int(config["linear_num_value_heads"]),
                       k_head_dim=int(config["linear_key_head_dim"]), v_head_dim=int(config["linear_value_head_dim"]),
                       conv_kernel=int(config.get("linear_conv_kernel_dim", 4)),
                       rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)))
        except KeyError as e:
            raise ValueError(f"config.json is missing {e.args[0]} (a Gated DeltaNet layer's size)") from None

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.k_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.v_head_dim

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def weight_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
        H, C, Hv = self.hidden, self.conv_channels, self.num_v_heads
        shared = {"conv1d": (C, 1, self.conv_kernel), "dt_bias": (Hv,), "A_log": (Hv,), "norm": (self.v_head_dim,),
                  "out_proj": (H, self.value_dim)}
        if layout == "qwen3_5_moe":
            return {"in_proj_qkv": (C, H), "in_proj_z": (self.value_dim, H), "in_proj_b": (Hv, H),
                    "in_proj_a": (Hv, H), **shared}
        resident_weight_names(layout)
        if layout == "qwen3_next_gguf":
            return {"in_proj_qkv": (C, H), "in_proj_z": (self.value_dim, H), "in_proj_ba": (2 * Hv, H), **shared}
        return {"in_proj_qkvz": (C + self.value_dim, H), "in_proj_ba": (2 * Hv, H), **shared}

    def workspace_nbytes(self, tokens: int, dtype: torch.dtype) -> int:
        """A bound on the bytes of tensors one prefill chunk of `tokens` tokens allocates in GatedDeltaNet.__call__
        at its worst moment (activations in dtype): the largest of its phases, each the whole-chunk tensors alive then
        plus that phase's block temporaries (float32, L = chunk tokens; conv, rule and norm go a block at a time)."""
        e, f = torch.empty(0, dtype=dtype).element_size(), 4
        T, L, C, V, Hv = tokens, min(tokens, self.chunk), self.conv_channels, self.value_dim, self.num_v_heads
        D = max(self.k_head_dim, self.v_head_dim)
        gates = T * Hv * (2 * e + 4 * f)  # b, a, beta; g and softplus's float32 temporaries
        conv_block = (L + self.conv_kernel) * C * (2 * e + 2 * f)  # cat, its weight-dtype copy, conv, silu
        # heads-first q, k, v (+ repeats, l2norm, padding), k_beta, v_beta, solves, v_new, outputs: ~12 [Hv, L, D];
        # pairwise, system, intra [Hv, L, L]; the float32 state and its next value
        rule_block = (12 * Hv * L * D + 3 * Hv * L * L + 2 * Hv * self.k_head_dim * self.v_head_dim) * f
        norm_block = 6 * L * V * f
        conv = T * (2 * C + V) * e + gates + conv_block  # projections (q|k|v, z) and the conv output
        rule = T * (C + 2 * V) * e + gates + rule_block  # conv output (q, k, v are views), z, the rule's output
        norm = T * 3 * V * e + norm_block  # z, the rule's output, the normed output
        return max(conv, rule, norm, T * (V + self.hidden) * e)

    def state_nbytes(self, conv_dtype: torch.dtype) -> int:
        """Bytes of one sequence's GatedDeltaState: conv state in conv_dtype, recurrent state in float32."""
        conv = (self.conv_kernel - 1) * self.conv_channels * torch.empty(0, dtype=conv_dtype).element_size()
        return conv + self.num_v_heads * self.k_head_dim * self.v_head_dim * 4


@dataclass
class GatedDeltaState:
    """One sequence's state in one Gated DeltaNet layer."""

    conv: torch.Tensor  # [W-1, C]: the last conv inputs (zeros before the first token)
    recurrent: torch.Tensor  # [Hv, Dk, Dv] float32
    tokens: int = 0  # tokens seen

    @classmethod
    def zeros(cls, shape: GatedDeltaShape, dtype: torch.dtype, device="cpu") -> "GatedDeltaState":
        return cls(torch.zeros(shape.conv_kernel - 1, shape.conv_channels, dtype=dtype, device=device),
                   torch.zeros(shape.num_v_heads, shape.k_head_dim, shape.v_head_dim, dtype=torch.float32,
                               device=device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.recurrent))

    def snapshot(self) -> "GatedDeltaState":
        """A copy that later updates of this state do not touch (for a prompt cache)."""
        return GatedDeltaState(self.conv.clone(), self.recurrent.clone(), self.tokens)

    def restore(self, snap: "GatedDeltaState") -> None:
        """Put this state back to snap (which stays as it is)."""
        if snap.conv.shape != self.conv.shape or snap.recurrent.shape != self.recurrent.shape:
            raise ValueError("a Gated DeltaNet snapshot of another layer shape cannot be restored here")
        self.conv, self.recurrent, self.tokens = snap.conv.clone(), snap.recurrent.clone(), snap.tokens


class GatedDeltaNet:
    """One linear_attention layer's mixer: x [T, H] (after the layer's input norm) -> [T, H], updating a state."""

    kind = "gated_delta"
    # Decode's recurrent update runs in C++ (kernels/gated_delta.py recurrent_step) where that module builds; the
    # projections, conv and norm stay torch ops, so the layer is not one of model.py's fused decode layers.
    fused_decode = False

    def __init__(self, shape: GatedDeltaShape, weights: dict[str, torch.Tensor], layout: str = "qwen3_5_moe",
                 name: str = "linear_attn"):
        """weights: resident_weight_names(layout) -> tensors of shape.weight_shapes(layout)."""
        want = shape.weight_shapes(layout)
        for n, s in want.items():
            if n not in weights:
                raise ValueError(f"{name}: missing Gated DeltaNet weight {n}")
            got = tuple(getattr(weights[n], "qweight", weights[n]).shape)  # a GGMLWeight: its logical shape
            if got != s and not (n == "conv1d" and got == (s[0], s[2])):
                raise ValueError(f"{name}.{n}: shape {got}, expected {s}")
        self.shape = shape
        self.layout = layout
        self.w = {n: weights[n] for n in want}
        self.conv_weight = weights["conv1d"].reshape(shape.conv_channels, shape.conv_kernel)  # [C, W]

    def new_state(self, dtype: torch.dtype | None = None, device="cpu") -> GatedDeltaState:
        """A fresh state; its conv part in the dtype of the activations that will run (the weights' by default)."""
        return GatedDeltaState.zeros(self.shape, dtype or self.w["out_proj"].dtype, device)

    def _project(self, x: torch.Tensor):
        """x [T, H] -> conv inputs [T, C] (q | k | v), z [T, Hv, Dv], b [T, Hv], a [T, Hv]."""
        s, w, T = self.shape, self.w, x.shape[0]
        if self.layout == "qwen3_5_moe":
            return (linear(x, w["in_proj_qkv"]), linear(x, w["in_proj_z"]).view(T, s.num_v_heads, s.v_head_dim),
                    linear(x, w["in_proj_b"]), linear(x, w["in_proj_a"]))
        r = s.num_v_heads // s.num_k_heads
        if self.layout == "qwen3_next_gguf":
            b, a = torch.split(linear(x, w["in_proj_ba"]).view(T, s.num_k_heads, 2 * r), [r, r], dim=-1)
            return (linear(x, w["in_proj_qkv"]), linear(x, w["in_proj_z"]).view(T, s.num_v_heads, s.v_head_dim),
                    b.reshape(T, -1), a.reshape(T, -1))
        qkvz = linear(x, w["in_proj_qkvz"]).view(T, s.num_k_heads, 2 * s.k_head_dim + 2 * r * s.v_head_dim)
        q, k, v, z = torch.split(qkvz, [s.k_head_dim, s.k_head_dim, r * s.v_head_dim, r * s.v_head_dim], dim=-1)
        b, a = torch.split(linear(x, w["in_proj_ba"]).view(T, s.num_k_heads, 2 * r), [r, r], dim=-1)
        mixed = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)
        return mixed, z.reshape(T, s.num_v_heads, s.v_head_dim), b.reshape(T, -1), a.reshape(T, -1)

    def __call__(self, x: torch.Tensor, state: GatedDeltaState) -> torch.Tensor:
        """x [T, H] continuing state (a prompt from its first token, a later part of it, or one decode token)."""
        s, w, T = self.shape, self.w, x.shape[0]
        mixed, z, b, a = self._project(x)
        mixed, state.conv = causal_conv1d(mixed, self.conv_weight, state.conv, s.chunk)
        q, k, v = torch.split(mixed, [s.key_dim, s.key_dim, s.value_dim], dim=-1)
        q, k = q.reshape(T, s.num_k_heads, s.k_head_dim), k.reshape(T, s.num_k_heads, s.k_head_dim)
        v = v.reshape(T, s.num_v_heads, s.v_head_dim)
        beta = b.sigmoid()
        g = -w["A_log"].float().exp() * F.softplus(a.float() + w["dt_bias"])  # [T, Hv], log decay
        tiled = s.tiled_value_heads and s.num_v_heads != s.num_k_heads  # [q_0 .. q_Hk-1, q_0 ..]: one per value head
        if T == 1 and state.tokens > 0:  # as transformers: the recurrent step for a decode token, chunks otherwise
            if tiled:
                q, k = (t.repeat(1, s.num_v_heads // s.num_k_heads, 1) for t in (q, k))
            out, state.recurrent = recurrent_step(q, k, v, g, beta, state.recurrent)
        else:  # a block of s.chunk tokens at a time (the heads repeated per block)
            out, state.recurrent = chunk_gated_delta_rule(q, k, v, g, beta, state.recurrent, s.chunk, tiled)
        del mixed, q, k, v
        state.tokens += T
        out = gated_rms_norm(out.reshape(-1, s.v_head_dim), z.reshape(-1, s.v_head_dim), w["norm"], s.rms_norm_eps,
                             block=s.chunk * s.num_v_heads)
        return linear(out.reshape(T, s.value_dim), w["out_proj"])

    def prefill(self, x: torch.Tensor, state: GatedDeltaState) -> torch.Tensor:
        return self(x, state)

    def decode(self, x: torch.Tensor, state: GatedDeltaState) -> torch.Tensor:
        """x [1, H]: one token after at least one earlier one."""
        if x.shape[0] != 1:
            raise ValueError(f"decode takes one token, got {x.shape[0]}")
        return self(x, state)


def shape_of(args) -> tuple[GatedDeltaShape, str]:
    """(shape, weight layout) of a model's Gated DeltaNet layers, from ModelArgs.linear_attention."""
    if not args.linear_attention:
        raise ValueError(f"{args.family}: linear_attention layers without their sizes (ModelArgs.linear_attention)")
    fields = dict(args.linear_attention)
    return GatedDeltaShape(**{k: v for k, v in fields.items() if k != "layout"}), fields["layout"]


class GatedDeltaMixer(TokenMixer):
    """The token-mixer seam over GatedDeltaNet: canonical weight names `layers.{L}.linear_attn.<name>`."""

    kind: ClassVar[str] = "linear_attention"
    positional: ClassVar[bool] = False
    PREFIX: ClassVar[str] = "linear_attn."

    def __init__(self, net: GatedDeltaNet):
        self.net = net

    @classmethod
    def weight_shapes(cls, args, layer: int) -> dict[str, tuple[int, ...]]:
        shape, layout = shape_of(args)
        return {cls.PREFIX + n: s for n, s in shape.weight_shapes(layout).items()}

    @classmethod
    def build(cls, args, layer: int, weights: dict[str, torch.Tensor], ctx: MixerContext) -> "GatedDeltaMixer":
        shape, layout = shape_of(args)
        net = GatedDeltaNet(shape, {n[len(cls.PREFIX):]: w for n, w in weights.items()}, layout, f"layer {layer}")
        return cls(net)

    @classmethod
    def state_nbytes(cls, args, max_tokens: int, dtype: torch.dtype) -> int:
        return shape_of(args)[0].state_nbytes(dtype)

    @classmethod
    def workspace_nbytes(cls, args, tokens: int, positions: int, dtype: torch.dtype) -> int:
        return shape_of(args)[0].workspace_nbytes(tokens, dtype)

    def new_state(self, dtype: torch.dtype, device) -> GatedDeltaState:
        return GatedDeltaState.zeros(self.net.shape, dtype, device)

    def forward(self, x: torch.Tensor, state: GatedDeltaState, start: int) -> torch.Tensor:
        if state.tokens != start:
            raise ValueError(f"a Gated DeltaNet state after {state.tokens} tokens cannot continue at position {start}")
        return self.net(x, state)
