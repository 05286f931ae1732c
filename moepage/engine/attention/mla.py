"""Multi-head latent attention (MLA: DeepSeek-V2/V3, GLM-4.7-Flash, Kimi K2), the "mla" layers.

Each token's keys and values come from one compressed latent: kv_a_proj_with_mqa projects the hidden state to the
latent c (kv_lora_rank wide, RMS-normed) and one decoupled rope key k_pe (qk_rope_head_dim wide, shared by all
heads). The cache holds exactly those, C + Dr values a token (576 for DeepSeek-V3), never the expanded per-head K/V.
kv_b_proj expands c into each head's no-rope key k_nope and value v. The query is q_proj(x), or with a low-rank q
(q_lora_rank) q_b_proj(norm(q_a_proj(x))); each head's query is [q_nope | q_pe].

- A prompt chunk (T > 1) expands the cached latents and attends like transformers' DeepseekV3Attention.
- One decode token runs the absorbed form: kv_b's key half is folded into the query (q_lat = q_nope W_uk, so
  q_nope . k_nope = q_lat . c) and its value half into the output (out = (p . c) W_uv^T), so attention runs over
  the latent cache directly: one [C + Dr]-wide "key" per position, the latent c its value.

RoPE layouts: "half" (rotate_half, rope_interleave false), "interleave" (DeepSeek-V3's pairs (x0, x1), ... rotated
in the activation dtype, written back de-interleaved as transformers does), "complex" (DeepSeek-V2's complex
multiply in float32, pairs kept interleaved). The softmax scale is (Dn + Dr)^-0.5 times YaRN's mscale(factor,
mscale_all_dim)^2, as transformers' yarn_apply_mscale.

Shape legend: T tokens in this step, H hidden, N heads, Rq q_lora_rank, C kv_lora_rank, Dn qk_nope_head_dim,
Dr qk_rope_head_dim, Dv v_head_dim, Dq = Dn + Dr, S positions attended.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from moepage.engine.attention.base import KVLayer, MixerContext, TokenMixer
from moepage.engine.kv_cache import KVCache
from moepage.engine.model_args import ConfigError, ModelArgs, bool_field, float_field, int_field
from moepage.kernels.chunk_attention import attend_chunk
from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.norm import rms_norm
from moepage.kernels.rope import RotaryTable, apply_rope

ROPE_LAYOUTS = ("half", "interleave", "complex")
LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: transformers builds them with the default eps
# canonical name (after layers.{L}.) -> checkpoint suffix (after the decoder layer's prefix)
CHECKPOINT_SUFFIX = {
    "q": "self_attn.q_proj.weight", "q_a": "self_attn.q_a_proj.weight", "q_a_bias": "self_attn.q_a_proj.bias",
    "q_a_norm": "self_attn.q_a_layernorm.weight", "q_b": "self_attn.q_b_proj.weight",
    "kv_a": "self_attn.kv_a_proj_with_mqa.weight", "kv_a_bias": "self_attn.kv_a_proj_with_mqa.bias",
    "kv_a_norm": "self_attn.kv_a_layernorm.weight", "kv_b": "self_attn.kv_b_proj.weight",
    "o": "self_attn.o_proj.weight", "o_bias": "self_attn.o_proj.bias",
}
# llama.cpp's names (conversion/deepseek.py, arch deepseek2); kv_b_proj is written split as k_b and v_b
GGUF_SUFFIX = {"q": "attn_q.weight", "q_a": "attn_q_a.weight", "q_a_norm": "attn_q_a_norm.weight",
               "q_b": "attn_q_b.weight", "kv_a": "attn_kv_a_mqa.weight", "kv_a_norm": "attn_kv_a_norm.weight",
               "k_b": "attn_k_b.weight", "v_b": "attn_v_b.weight", "o": "attn_output.weight"}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class MLAShape:
    num_heads: int
    q_lora_rank: int  # 0: a full-rank q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float
    rope_layout: str = "interleave"
    attention_bias: bool = False
    # kv_b_proj stored as llama.cpp's converter writes it for the absorbed form: k_b [N, C, Dn] (the key half,
    # transposed) and v_b [N, Dv, C]
    split_kv_b: bool = False

    def __post_init__(self):
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ConfigError(f"MLA rope layout {self.rope_layout!r}; known: {', '.join(ROPE_LAYOUTS)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim {self.qk_rope_head_dim} must be even (rotary pairs)")

    @classmethod
    def from_config(cls, config: dict, rope_scaling: dict | None, rope_layout: str) -> "MLAShape":
        """From a text config.json (deepseek_v2/v3, glm4_moe_lite, kimi_k2); every size bounded, errors name the
        key."""
        heads = int_field(config, "num_attention_heads")
        q_rank = int_field(config, "q_lora_rank", 0, lo=0, hi=1 << 16)
        dims = {k: int_field(config, k, hi=1 << 12) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
        scale = (dims["qk_nope_head_dim"] + dims["qk_rope_head_dim"]) ** -0.5
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None,
                                                                                                         "default"):
            all_dim = float_field(rope_scaling, "mscale_all_dim", 0.0, positive=False)
            float_field(rope_scaling, "mscale", 1.0, positive=False)
            if all_dim:
                m = yarn_mscale(float_field(rope_scaling, "factor", 1.0), all_dim)
                scale = scale * m * m
        return cls(num_heads=heads, q_lora_rank=q_rank, kv_lora_rank=int_field(config, "kv_lora_rank", hi=1 << 16),
                   softmax_scale=scale, rope_layout=rope_layout,
                   attention_bias=bool_field(config, "attention_bias", False),
                   split_kv_b=bool_field(config, "mla_split_kv_b", False), **dims)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token and layer: the latent and the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def weight_shapes(self, hidden: int) -> dict[str, tuple[int, ...]]:
        H, N, C, Dr = hidden, self.num_heads, self.kv_lora_rank, self.qk_rope_head_dim
        shapes: dict[str, tuple[int, ...]] = {}
        if self.q_lora_rank:
            shapes |= {"q_a": (self.q_lora_rank, H), "q_a_norm": (self.q_lora_rank,),
                       "q_b": (N * self.qk_head_dim, self.q_lora_rank)}
            if self.attention_bias:
                shapes["q_a_bias"] = (self.q_lora_rank,)
        else:
            shapes["q"] = (N * self.qk_head_dim, H)
        shapes |= {"kv_a": (C + Dr, H), "kv_a_norm": (C,), "o": (H, N * self.v_head_dim)}
        if self.split_kv_b:
            shapes |= {"k_b": (N, C, self.qk_nope_head_dim), "v_b": (N, self.v_head_dim, C)}
        else:
            shapes["kv_b"] = (N * (self.qk_nope_head_dim + self.v_head_dim), C)
        if self.attention_bias:
            shapes |= {"kv_a_bias": (C + Dr,), "o_bias": (H,)}
        return shapes


def checkpoint_names(prefix: str = "model.layers.{L}.", suffixes: dict | None = None) -> dict[str, str]:
    """The MLA weights' canonical names (layers.{L}.<name>) -> checkpoint names, as transformers writes them (or
    llama.cpp: checkpoint_names("blk.{L}.", GGUF_SUFFIX))."""
    return {f"layers.{{L}}.{n}": prefix + s for n, s in (suffixes or CHECKPOINT_SUFFIX).items()}


class MultiLatentAttention(TokenMixer):
    kind: ClassVar[str] = "mla"
    positional: ClassVar[bool] = True  # the latent cache is a slot of the shared KV cache (keys only)

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], ctx: MixerContext):
        self.s = s = MLAShape(**args.mla)
        self.w = weights
        self.get = weights.get
        self.rope = ctx.rope  # [*, Dr] in the activation dtype, YaRN's attention factor applied
        if s.rope_layout == "complex":  # DeepSeek-V2 multiplies in float32
            self.rope = RotaryTable(args.rotary_dim, args.rope_theta, args.rope_scaling, torch.float32, ctx.device)
        N, Dn, Dv, C = s.num_heads, s.qk_nope_head_dim, s.v_head_dim, s.kv_lora_rank
        for name in ("kv_b", "k_b", "v_b"):  # held float32 (weight_names.resident_dtype): the model dtype's values
            t = weights.get(name)
            if t is not None and t.dtype != ctx.dtype:
                t.copy_(t.to(ctx.dtype))
        if s.split_kv_b:
            self.w_uk = weights["k_b"].transpose(1, 2)  # [N, Dn, C]
            self.w_uv_t = weights["v_b"].transpose(1, 2)  # [N, C, Dv]
        else:
            kv_b = weights["kv_b"].view(N, Dn + Dv, C)
            self.w_uk = kv_b[:, :Dn]  # [N, Dn, C]: q_nope [1, Dn] @ it -> the query in latent space
            self.w_uv_t = kv_b[:, Dn:].transpose(1, 2)  # [N, C, Dv]: a latent output [1, C] @ it -> v space

    @classmethod
    def weight_shapes(cls, args: ModelArgs, layer: int) -> dict[str, tuple[int, ...]]:
        return MLAShape(**args.mla).weight_shapes(args.hidden_size)

    @classmethod
    def build(cls, args: ModelArgs, layer: int, weights: dict[str, torch.Tensor], ctx: MixerContext):
        return cls(args, weights, ctx)

    @classmethod
    def cache_shape(cls, args: ModelArgs) -> tuple[int, int, int | None]:
        return 1, MLAShape(**args.mla).latent_dim, 0  # one [c | k_pe] row a token, no separate values

    @classmethod
    def state_nbytes(cls, args: ModelArgs, max_tokens: int, dtype: torch.dtype) -> int:
        return KVCache.bytes_for(1, 1, MLAShape(**args.mla).latent_dim, max_tokens, dtype, value_dim=0)

    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [n, T, Dr] at positions start.. -> rotated, in the layout transformers writes for this family."""
        cos, sin = self.rope.get(start, x.shape[1])  # [T, Dr]: cat(freqs, freqs)
        layout = self.s.rope_layout
        if layout == "half":
            return apply_rope(x.unsqueeze(0).contiguous(), cos, sin)[0]
        half = cos.shape[-1] // 2
        cos, sin = cos[:, :half], sin[:, :half]  # [T, Dr/2], one angle per pair
        if layout == "interleave":
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        a, b = x[..., 0::2].float(), x[..., 1::2].float()  # (a + ib)(cos + i sin), pairs stay interleaved
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)

    def forward(self, x: torch.Tensor, state: KVLayer, start: int) -> torch.Tensor:
        s, w, get = self.s, self.w, self.get
        T, N, C = x.shape[0], s.num_heads, s.kv_lora_rank
        if s.q_lora_rank:
            q = linear(rms_norm(linear(x, w["q_a"], get("q_a_bias")), w["q_a_norm"], LATENT_NORM_EPS), w["q_b"])
        else:
            q = linear(x, w["q"])
        q = q.view(T, N, s.qk_head_dim).transpose(0, 1)  # [N, T, Dq]
        q_nope, q_pe = torch.split(q, [s.qk_nope_head_dim, s.qk_rope_head_dim], dim=-1)
        kv = linear(x, w["kv_a"], get("kv_a_bias"))  # [T, C + Dr]
        c, k_pe = torch.split(kv, [C, s.qk_rope_head_dim], dim=-1)
        c = rms_norm(c.contiguous(), w["kv_a_norm"], LATENT_NORM_EPS)  # [T, C]
        q_pe = self._rope(q_pe, start)  # [N, T, Dr]
        k_pe = self._rope(k_pe.unsqueeze(0), start)[0]  # [T, Dr]
        latent = torch.cat([c, k_pe], dim=-1)  # [T, C + Dr]: what the cache keeps
        cached, _ = state.update(latent.view(1, 1, T, s.latent_dim), None, start)
        cached = cached[0, 0]  # [S, C + Dr]
        if T == 1:
            out = self._absorbed(q_nope, q_pe, cached)
        else:
            out = self._expanded(q_nope, q_pe, cached, start)
        return linear(out, w["o"], get("o_bias"))  # [T, H]

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        """One token: q_nope [N, 1, Dn], q_pe [N, 1, Dr] over the latent cache [S, C + Dr] -> [1, N*Dv], in float32
        inside (as llama.cpp's f32 activations): the absorbed sums run in another order than the expanded form, and
        rounding q_lat or the latent output to bf16 moves logits by a few bf16 steps. kv_b's halves are float32
        already (resident so: no upcast per token)."""
        s, N = self.s, self.s.num_heads
        q_lat = torch.bmm(q_nope.float(), self.w_uk.float())  # [N, 1, C]
        query = torch.cat([q_lat, q_pe.float()], dim=-1).view(1, 1, N, s.latent_dim)  # heads as rows of one block
        keys = cached[None, None].float()  # [1, 1, S, C + Dr]
        out = F.scaled_dot_product_attention(query, keys, keys[..., :s.kv_lora_rank], scale=s.softmax_scale)
        out = torch.bmm(out.view(N, 1, s.kv_lora_rank), self.w_uv_t.float())  # [N, 1, Dv]
        return out.reshape(1, N * s.v_head_dim).to(q_nope.dtype)

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cached: torch.Tensor, start: int) -> torch.Tensor:
        """A chunk of T tokens at start..: the cache's latents expanded into per-head keys and values -> [T, N*Dv]."""
        s, N, T, S = self.s, self.s.num_heads, q_nope.shape[1], cached.shape[0]
        Dn = s.qk_nope_head_dim
        c = cached[:, :s.kv_lora_rank]  # [S, C]
        if s.split_kv_b:
            k_nope = torch.matmul(c, self.w_uk.transpose(1, 2).to(c.dtype))  # [N, S, Dn]
            v = torch.matmul(c, self.w_uv_t.to(c.dtype))  # [N, S, Dv]
        else:  # one matmul, as transformers' kv_b_proj (bit-identical in bf16)
            kv = linear(c, self.w["kv_b"].to(c.dtype)).view(S, N, Dn + s.v_head_dim).transpose(0, 1)
            k_nope, v = torch.split(kv, [Dn, s.v_head_dim], dim=-1)  # [N, S, Dn], [N, S, Dv]
        keys = torch.cat([k_nope, cached[:, s.kv_lora_rank:].expand(N, S, s.qk_rope_head_dim)], dim=-1)  # [N, S, Dq]
        query = torch.cat([q_nope, q_pe], dim=-1)  # [N, T, Dq]
        # flash with a bool [T, S] mask (SDPA's own choice for keys wider than values was the math path's scores)
        out = attend_chunk(query[None], keys[None], v[None], start, 0, s.softmax_scale)
        return out[0].transpose(0, 1).reshape(T, N * s.v_head_dim)  # [T, N*Dv]
