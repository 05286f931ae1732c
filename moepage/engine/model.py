"""The decoder shared by every supported MoE family; family differences live in ModelArgs.

Shape legend: T tokens in this step, H hidden, N query heads, G kv heads, D head dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from moepage.engine.kv_cache import ContextOverflow, KVCache
from moepage.engine.model_args import ModelArgs
from moepage.engine.moe import SparseMoE
from moepage.kernels import native
from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.experts import swiglu
from moepage.kernels.ggml_decode import quantized_decode_kernel
from moepage.kernels.norm import rms_norm
from moepage.kernels.rope import RotaryTable, apply_rope
from moepage.paging.bf16_12bit import PackedMatrix
from moepage.paging.cache import ExpertCache


QK_NORM_MODE = {None: 0, "head": 1, "full": 2}


@dataclass
class Layer:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    moe: SparseMoE | None = None
    dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class MoEModel:
    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], cache: ExpertCache, dtype, device="cpu",
                 embed_rows: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.args = args
        self.dtype = dtype
        self.device = torch.device(device)
        self.cache = cache
        self.embed = weights.get("embed")  # [V, H]; None when embed_rows reads it from disk
        self.embed_rows = embed_rows
        self.norm = weights["norm"]
        self.lm_head = weights["embed"] if args.tie_word_embeddings else weights["lm_head"]  # [V, H]
        self.rope = RotaryTable(args.head_dim, args.rope_theta, args.rope_scaling, dtype, self.device)
        self.scale = args.head_dim**-0.5
        self.layers: list[Layer] = []
        for i in range(args.num_layers):
            p = f"layers.{i}."
            opt = lambda n: weights.get(p + n)  # noqa: E731
            layer = Layer(**{n: weights[p + n] for n in ("attn_norm", "ffn_norm", "q", "k", "v", "o")})
            for n in ("q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm"):
                setattr(layer, n, opt(n))
            if args.sparse_layers[i]:
                shared = None
                if args.shared_expert_intermediate_size:
                    shared = (weights[p + "shared_gate"], weights[p + "shared_up"], weights[p + "shared_down"])
                layer.moe = SparseMoE(i, weights[p + "router"], args.routing, cache, shared, opt("shared_expert_gate"))
            else:
                layer.dense = (weights[p + "dense_gate"], weights[p + "dense_up"], weights[p + "dense_down"])
            self.layers.append(layer)

        blocks = self.moe_blocks
        for a, b in zip(blocks, blocks[1:]):
            a.next = b
        self._decode_kernel = self._attention_decode_kernel()

    @property
    def moe_blocks(self) -> list[SparseMoE]:
        return [layer.moe for layer in self.layers if layer.moe is not None]

    def _attention_decode_kernel(self):
        """The C++ kernel that runs a decode token through a layer's attention half in one call, or None where the
        model is not all plain bf16 CPU tensors (quantized GGUF attention, float32, another device)."""
        a = self.args
        if a.clip_qkv is None and (quantized := quantized_decode_kernel(self.layers, self.dtype, self.device)):
            return quantized  # GGML weights (a quantized GGUF): the same call over ggml's kernels
        if self.dtype != torch.bfloat16 or self.device.type != "cpu" or a.clip_qkv is not None:
            return None
        plain = lambda t: t is None or (type(t) is torch.Tensor and t.dtype == torch.bfloat16  # noqa: E731
                                        and t.is_contiguous())
        for layer in self.layers:
            router = layer.moe.router if layer.moe is not None else None
            if not all(plain(t) for t in (layer.attn_norm, layer.ffn_norm, layer.q, layer.k, layer.v, layer.o,
                                          layer.q_bias, layer.k_bias, layer.v_bias, layer.o_bias, layer.q_norm,
                                          layer.k_norm, router)):
                return None
        return native.load("bf16_decode")

    def _decode_layer(self, i: int, layer: Layer, h: torch.Tensor, kv: KVCache, start: int, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
        """h [1, H] -> [1, H] for one decode token at position start (cos, sin [D] its RoPE rows): attention, norms,
        router and routing in one kernel call, then the MoE."""
        a = self.args
        moe = layer.moe
        router = moe.router if moe is not None and moe.elastic is None else None
        top_k = moe.routing.top_k if router is not None and moe.routes_in_kernel else 0
        h, r, logits, experts, weights = self._decode_kernel.attention_decode(
            h, layer.attn_norm, layer.ffn_norm, a.rms_norm_eps, layer.q, layer.k, layer.v, layer.o,
            layer.q_bias, layer.k_bias, layer.v_bias, layer.o_bias, QK_NORM_MODE[a.qk_norm], layer.q_norm,
            layer.k_norm, cos, sin, kv.layer_k[i], kv.layer_v[i], start, self.scale, router, top_k,
            moe is not None and moe.routing.norm_topk_prob, moe is not None and moe.routing.weights_in_logits_dtype)
        if top_k:
            return moe.decode_routed(r, experts, weights, h)
        if moe is not None:
            return h + moe(r, logits=logits)
        return h + swiglu(r, *layer.dense)

    def new_kv_cache(self, max_tokens: int) -> KVCache:
        a = self.args
        return KVCache(a.num_layers, a.num_kv_heads, a.head_dim, max_tokens, self.dtype, self.device)

    def _attention(self, i: int, layer: Layer, x: torch.Tensor, kv: KVCache, start: int) -> torch.Tensor:
        a = self.args
        T = x.shape[0]
        q = linear(x, layer.q, layer.q_bias)  # [T, N*D]
        k = linear(x, layer.k, layer.k_bias)  # [T, G*D]
        v = linear(x, layer.v, layer.v_bias)
        if a.qk_norm == "full":
            q = rms_norm(q, layer.q_norm, a.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, a.rms_norm_eps)
        if a.clip_qkv is not None:
            q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
        q = q.view(1, T, a.num_heads, a.head_dim)
        k = k.view(1, T, a.num_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q = rms_norm(q, layer.q_norm, a.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, a.rms_norm_eps)
        q = q.transpose(1, 2)  # [1, N, T, D]
        k = k.transpose(1, 2)  # [1, G, T, D]
        v = v.view(1, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        cos, sin = self.rope.get(start, T)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = kv.update(i, k, v, start)  # [1, G, S, D]
        window = a.sliding_window
        if T == 1 and (window is None or keys.shape[2] <= window):  # one new token sees every cached position
            # The query heads sharing a kv head become rows of one query block: no K/V expansion for GQA
            # (10x faster at 576 positions, bit-identical: every query row is computed on its own).
            G = a.num_kv_heads
            out = F.scaled_dot_product_attention(q.reshape(1, G, a.num_heads // G, a.head_dim), keys, values,
                                                 scale=self.scale)
            out = out.reshape(1, a.num_heads, 1, a.head_dim)  # [1, N, 1, D]
        elif start == 0 and (window is None or T <= window):
            out = F.scaled_dot_product_attention(
                q, keys, values, is_causal=T > 1, scale=self.scale, enable_gqa=a.num_heads != a.num_kv_heads
            )
        else:
            S = keys.shape[2]
            qpos = torch.arange(start, start + T, device=x.device)[:, None]
            kpos = torch.arange(S, device=x.device)[None, :]
            mask = kpos <= qpos  # [T, S]
            if window is not None:
                mask &= kpos > qpos - window
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=a.num_heads != a.num_kv_heads
            )
        out = out.transpose(1, 2).reshape(T, a.num_heads * a.head_dim)  # [T, N*D]
        return linear(out, layer.o, layer.o_bias)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVCache, start: int | None = None, all_logits: bool = False):
        """tokens [T] at positions start..start+T -> logits [T, V] (all_logits) or [1, V] for the last token."""
        start = kv.length if start is None else start
        a = self.args
        if self.embed_rows is not None:
            h = self.embed_rows(tokens)  # [T, H]
        else:
            h = F.embedding(tokens.to(self.device), self.embed)  # [T, H]
        window = a.sliding_window
        fused = (self._decode_kernel is not None and tokens.shape[0] == 1 and (window is None or start < window))
        if fused:
            if start >= kv.max_tokens:
                raise ContextOverflow(start + 1, kv.max_tokens)
            cos, sin = (t[0] for t in self.rope.get(start, 1))
        for i, layer in enumerate(self.layers):
            if fused:
                h = self._decode_layer(i, layer, h, kv, start, cos, sin)
                continue
            r = rms_norm(h, layer.attn_norm, a.rms_norm_eps)
            h = h + self._attention(i, layer, r, kv, start)
            r = rms_norm(h, layer.ffn_norm, a.rms_norm_eps)
            h = h + (layer.moe(r) if layer.moe is not None else swiglu(r, *layer.dense))
        kv.length = start + tokens.shape[0]
        if not all_logits:
            h = h[-1:]
        h = rms_norm(h, self.norm, a.rms_norm_eps)
        if isinstance(self.lm_head, PackedMatrix):
            return self.lm_head.linear(h, linear)  # [T|1, V], bit for bit the bf16 matrix's product
        return linear(h, self.lm_head)  # [T|1, V]
