"""Grouped-query softmax attention (the "full_attention" layers of every family): q/k RMSNorm per head or over all
heads, qkv and output biases, qkv clipping, a sliding window, RoPE on all or the first part of each head, the
sigmoid output gate of Qwen3.5/3.6 and Qwen3-Next (a doubled q_proj: per head [q, gate]), and gpt-oss's learned
per-head sinks (kernels/sink_attention.py).

Shape legend: T tokens in this step, H hidden, N query heads, G kv heads, D head dim, R rotary dims (<= D),
S positions attended.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from moepage.engine.attention.base import KVLayer, MixerContext, TokenMixer
from moepage.engine.kv_cache import KVCache
from moepage.engine.model_args import ModelArgs
from moepage.kernels.chunk_attention import attend_chunk
from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.norm import rms_norm, rms_norm_float_weight, rms_norm_unit_offset
from moepage.kernels.rope import apply_rope
from moepage.kernels.sink_attention import attend_with_sinks

QK_NORM_MODE = {None: 0, "head": 1, "full": 2}  # the fused decode kernels' q/k norm argument
OPTIONAL = ("q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm", "sinks")


def norm_of(args: ModelArgs):
    """The RMSNorm of a family's main norms: Llama's (w * h rounded first) or the zero-centred 1 + w."""
    if args.norm_float_weight:
        return rms_norm_float_weight
    return rms_norm_unit_offset if args.norm_unit_offset else rms_norm


class GQA(TokenMixer):
    kind: ClassVar[str] = "full_attention"
    positional: ClassVar[bool] = True

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], ctx: MixerContext):
        self.args = args
        self.q, self.k, self.v, self.o = (weights[n] for n in ("q", "k", "v", "o"))
        for n in OPTIONAL:
            setattr(self, n, weights.get(n))
        self.rope = ctx.rope
        self.scale = args.head_dim**-0.5
        self.norm = norm_of(args)
        # the bf16/GGML decode kernels compute exactly this layer: Llama norms, full-width RoPE, no gate, no clip
        self.fused_decode = (not args.attn_output_gate and args.rotary_dim == args.head_dim
                             and not args.norm_unit_offset and args.clip_qkv is None and not args.attn_sinks
                             and not args.norm_float_weight)

    @classmethod
    def weight_shapes(cls, args: ModelArgs, layer: int) -> dict[str, tuple[int, ...]]:
        H, D = args.hidden_size, args.head_dim
        q, kv = args.num_heads * D, args.num_kv_heads * D
        shapes = {"q": (2 * q if args.attn_output_gate else q, H), "k": (kv, H), "v": (kv, H), "o": (H, q)}
        if args.qkv_bias:
            shapes |= {"q_bias": (shapes["q"][0],), "k_bias": (kv,), "v_bias": (kv,)}
        if args.o_bias:
            shapes["o_bias"] = (H,)
        if args.qk_norm:
            per_head = args.qk_norm == "head"
            shapes |= {"q_norm": (D,) if per_head else (q,), "k_norm": (D,) if per_head else (kv,)}
        if args.attn_sinks:
            shapes["sinks"] = (args.num_heads,)
        return shapes

    @classmethod
    def build(cls, args: ModelArgs, layer: int, weights: dict[str, torch.Tensor], ctx: MixerContext) -> "GQA":
        return cls(args, weights, ctx)

    @classmethod
    def state_nbytes(cls, args: ModelArgs, max_tokens: int, dtype: torch.dtype) -> int:
        return KVCache.bytes_for(1, args.num_kv_heads, args.head_dim, max_tokens, dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [1, N, T, D]; cos, sin [T, R]: RoPE on the first R dims of each head, the rest passes through."""
        R = cos.shape[-1]
        if R == x.shape[-1]:
            return apply_rope(x, cos, sin)
        return torch.cat([apply_rope(x[..., :R].contiguous(), cos, sin), x[..., R:]], dim=-1)

    def forward(self, x: torch.Tensor, state: KVLayer, start: int) -> torch.Tensor:
        a = self.args
        T, N, G, D = x.shape[0], a.num_heads, a.num_kv_heads, a.head_dim
        q = linear(x, self.q, self.q_bias)  # [T, N*D] (gated: [T, N*2D])
        k = linear(x, self.k, self.k_bias)  # [T, G*D]
        v = linear(x, self.v, self.v_bias)
        gate = None
        if a.attn_output_gate:
            q, gate = torch.chunk(q.view(T, N, 2 * D), 2, dim=-1)  # [T, N, D] each
            gate = gate.reshape(T, N * D)
        if a.qk_norm == "full":
            q = self.norm(q, self.q_norm, a.rms_norm_eps)
            k = self.norm(k, self.k_norm, a.rms_norm_eps)
        if a.clip_qkv is not None:
            q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
        q = q.reshape(1, T, N, D)
        k = k.view(1, T, G, D)
        if a.qk_norm == "head":
            q = self.norm(q, self.q_norm, a.rms_norm_eps)
            k = self.norm(k, self.k_norm, a.rms_norm_eps)
        q = q.transpose(1, 2)  # [1, N, T, D]
        k = k.transpose(1, 2)  # [1, G, T, D]
        v = v.view(1, T, G, D).transpose(1, 2)
        cos, sin = self.rope.get(start, T)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        keys, values, k_start = self._cache(state, k, v, start)  # [1, G, S, D], S positions from k_start
        out = self._attend(q, keys, values, start, k_start)  # [1, N, T, D]
        out = out.transpose(1, 2).reshape(T, N * D)  # [T, N*D]
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return linear(out, self.o, self.o_bias)

    def _cache(self, state: KVLayer, k: torch.Tensor, v: torch.Tensor, start: int):
        """k, v [1, G, T, D] at start.. into the state -> (every key and value so far, the first one's position)."""
        keys, values = state.update(k, v, start)
        return keys, values, 0

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                k_start: int = 0) -> torch.Tensor:
        a = self.args
        if self.sinks is not None:
            return attend_with_sinks(q, keys, values, self.sinks, self.scale, start, k_start, a.sliding_window)
        T, window = q.shape[2], a.sliding_window
        if T == 1 and (window is None or keys.shape[2] <= window):  # one new token sees every cached position
            # The query heads sharing a kv head become rows of one query block: no K/V expansion for GQA
            # (10x faster at 576 positions, bit-identical: every query row is computed on its own).
            G = a.num_kv_heads
            out = F.scaled_dot_product_attention(q.reshape(1, G, a.num_heads // G, a.head_dim), keys, values,
                                                 scale=self.scale)
            return out.reshape(1, a.num_heads, 1, a.head_dim)
        gqa = a.num_heads != a.num_kv_heads
        if start == 0 and (window is None or T <= window):
            return F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1, scale=self.scale, enable_gqa=gqa)
        return attend_chunk(q, keys, values, start, k_start, self.scale, window)  # flash, a bool [T, S] mask

