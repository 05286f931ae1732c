"""Gemma 4's attention layers ("sliding_attention" and "full_attention" in its config.json layer_types, named
gemma4_sliding_attention / gemma4_full_attention here): GQA with a scaled RMSNorm on each q and k head and an unscaled
one on each v head, attention scale 1 (the q/k norms set the scale), RoPE with its own theta per kind (the full
layers' "proportional" RoPE turns only the first partial_rotary_factor of each head's frequency pairs, over the whole
head), a norm on the attention output (post_attention_layernorm) before the residual add.

Sliding layers keep the keys and values of their last window - 1 positions (WindowState, the bytes the budget
counts); full layers a slot of the model's KV cache, with their own head width and kv heads (global_head_dim,
num_global_key_value_heads) and, with attention_k_eq_v, no v_proj: the values are the keys' projection before the
k norm and RoPE. Every op follows transformers' Gemma4TextAttention, in the same order and dtype.

Shape legend: T tokens in this step, H hidden, N query heads, G kv heads, D head dim (of this kind), S positions
attended, P cached positions of a sliding layer (at most window - 1).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from moepage.engine.attention.base import KVLayer, MixerContext, TokenMixer
from moepage.engine.attention.sliding import WindowState
from moepage.engine.kv_cache import KVCache
from moepage.engine.model_args import ModelArgs
from moepage.kernels.chunk_attention import attend_chunk
from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.norm import rms_norm_float_weight

SLIDING, FULL = "gemma4_sliding_attention", "gemma4_full_attention"


def unscaled_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 4's RMSNorm without a weight (v heads, the router input): in float32, rounded once."""
    h = x.to(torch.float32)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def inverse_frequencies(kind: dict) -> torch.Tensor:
    """[D/2] RoPE frequencies of one layer kind: the first rope_fraction of the pairs turn (base^(-2i/D), over the
    whole head width D), the rest do not (frequency 0); transformers' default and proportional RoPE."""
    D = kind["head_dim"]
    turned = int(kind["rope_fraction"] * D // 2)
    inv = 1.0 / (kind["rope_theta"] ** (torch.arange(0, 2 * turned, 2, dtype=torch.int64).float() / D))
    inv = torch.cat([inv, torch.zeros(D // 2 - turned)])
    return inv / kind.get("rope_factor", 1.0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Gemma4Attention(TokenMixer):
    kind: ClassVar[str] = FULL
    positional: ClassVar[bool] = True
    fused_decode = False  # torch ops (the bf16/GGML decode kernels compute Llama-style layers)

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], ctx: MixerContext):
        self.args = args
        self.shape = self.kind_shape(args)
        self.q, self.k, self.o = weights["q"], weights["k"], weights["o"]
        self.v = weights.get("v")  # None: attention_k_eq_v
        self.q_norm, self.k_norm, self.out_norm = weights["q_norm"], weights["k_norm"], weights["out_norm"]
        self.dtype, self.device = ctx.dtype, ctx.device
        self.inv_freq = inverse_frequencies(self.shape).to(ctx.device)  # [D/2]
        if "rope_freqs" in weights:  # a GGUF's factors (1: turns, 1e30: does not), llama.cpp's proportional RoPE
            self.inv_freq = self.inv_freq / weights["rope_freqs"].to(device=ctx.device, dtype=torch.float32)

    @classmethod
    def kind_shape(cls, args: ModelArgs) -> dict:
        """head_dim, kv_heads, rope_theta, rope_fraction, k_eq_v (and window) of this kind (families/gemma4.py)."""
        return args.attention_kinds[cls.kind]

    @classmethod
    def weight_shapes(cls, args: ModelArgs, layer: int) -> dict[str, tuple[int, ...]]:
        s = cls.kind_shape(args)
        H, D = args.hidden_size, s["head_dim"]
        q, kv = args.num_heads * D, s["kv_heads"] * D
        shapes = {"q": (q, H), "k": (kv, H), "v": (kv, H), "o": (H, q), "q_norm": (D,), "k_norm": (D,),
                  "out_norm": (H,)}
        if s["k_eq_v"]:
            del shapes["v"]
        if s.get("freq_factors"):
            shapes["rope_freqs"] = (D // 2,)
        return shapes

    @classmethod
    def build(cls, args: ModelArgs, layer: int, weights: dict[str, torch.Tensor], ctx: MixerContext):
        return cls(args, weights, ctx)

    @classmethod
    def cache_shape(cls, args: ModelArgs) -> tuple[int, int, int | None]:
        s = cls.kind_shape(args)
        return s["kv_heads"], s["head_dim"], None

    @classmethod
    def state_nbytes(cls, args: ModelArgs, max_tokens: int, dtype: torch.dtype) -> int:
        s = cls.kind_shape(args)
        return KVCache.bytes_for(1, s["kv_heads"], s["head_dim"], max_tokens, dtype)

    def _rope(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] for positions start..start+T, as transformers computes and rounds them."""
        pos = torch.arange(start, start + T, device=self.device).float()
        freqs = pos[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

    def forward(self, x: torch.Tensor, state, start: int) -> torch.Tensor:
        a, s = self.args, self.shape
        T, N, G, D = x.shape[0], a.num_heads, s["kv_heads"], s["head_dim"]
        norm = rms_norm_float_weight
        cos, sin = self._rope(start, T)
        q = norm(linear(x, self.q).view(T, N, D), self.q_norm, a.rms_norm_eps)
        q = (q * cos + rotate_half(q) * sin).transpose(0, 1)[None]  # [1, N, T, D]
        k = linear(x, self.k).view(T, G, D)
        v = k if self.v is None else linear(x, self.v).view(T, G, D)
        k = norm(k, self.k_norm, a.rms_norm_eps)
        k = (k * cos + rotate_half(k) * sin).transpose(0, 1)[None]  # [1, G, T, D]
        v = unscaled_rms_norm(v, a.rms_norm_eps).transpose(0, 1)[None]
        keys, values, k_start = self._cache(state, k.contiguous(), v.contiguous(), start)  # [1, G, S, D]
        out = self._attend(q, keys, values, start, k_start)  # [1, N, T, D]
        out = linear(out[0].transpose(0, 1).reshape(T, N * D), self.o)  # [T, H]
        return norm(out, self.out_norm, a.rms_norm_eps)

    def _cache(self, state: KVLayer, k: torch.Tensor, v: torch.Tensor, start: int):
        keys, values = state.update(k, v, start)
        return keys, values, 0

    window: int | None = None  # full layers see every earlier position

    def _attend(self, q, keys, values, start: int, k_start: int) -> torch.Tensor:
        return attend_chunk(q, keys, values, start, k_start, 1.0, self.window)  # flash, a bool [T, S] mask


class Gemma4SlidingAttention(Gemma4Attention):
    kind: ClassVar[str] = SLIDING
    positional: ClassVar[bool] = False  # its own bounded state, not a slot of the growing KV cache

    @classmethod
    def state_nbytes(cls, args: ModelArgs, max_tokens: int, dtype: torch.dtype) -> int:
        s = cls.kind_shape(args)
        kept = min(max_tokens, s["window"] - 1)
        return 2 * s["kv_heads"] * kept * s["head_dim"] * torch.empty(0, dtype=dtype).element_size()

    def new_state(self, dtype: torch.dtype, device) -> WindowState:
        empty = torch.empty(1, self.shape["kv_heads"], 0, self.shape["head_dim"], dtype=dtype, device=device)
        return WindowState(empty, empty.clone())

    def forward(self, x: torch.Tensor, state: WindowState, start: int) -> torch.Tensor:
        if start != state.tokens:
            raise ValueError(f"sliding-window state holds {state.tokens} positions, asked to continue at {start}")
        return super().forward(x, state, start)

    def _cache(self, state: WindowState, k: torch.Tensor, v: torch.Tensor, start: int):
        """The kept keys and values followed by k, v [1, G, T, D]; the state keeps the last window - 1."""
        keys, values = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        first = start - state.k.shape[2]
        keep = min(self.shape["window"] - 1, keys.shape[2])
        state.k = keys[:, :, keys.shape[2] - keep:].contiguous()
        state.v = values[:, :, values.shape[2] - keep:].contiguous()
        state.tokens = start + k.shape[2]
        return keys, values, first

    @property
    def window(self) -> int:
        return self.shape["window"]
