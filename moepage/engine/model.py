"""The decoder shared by every supported MoE family: per layer a token mixer (attention/: GQA, ...) and an FFN
(SparseMoE or a dense SwiGLU); family differences live in ModelArgs and the mixers.

Shape legend: T tokens in this step, H hidden, V vocab, D head dim, R rotary dims.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from moepage.engine.attention import mixer_class
from moepage.engine.attention.base import KVLayer, MixerContext, TokenMixer
from moepage.engine.attention.gqa import QK_NORM_MODE, norm_of
from moepage.engine.kv_cache import ContextOverflow, KVCache
from moepage.engine.layer_blocks import block_class
from moepage.engine.model_args import ModelArgs
from moepage.engine.moe import SparseMoE
from moepage.engine.router import Router
from moepage.engine.sequence_state import SequenceState
from moepage.kernels import native
from moepage.kernels.bf16_token import Bf16DecodeKernel
from moepage.kernels.cpu_bf16 import linear
from moepage.kernels.experts import swiglu
from moepage.kernels.ggml_decode import quantized_decode_kernel
from moepage.kernels.rope import RotaryTable
from moepage.paging.bf16_12bit import PackedMatrix
from moepage.paging.cache import ExpertCache


@dataclass
class Layer:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    mixer: TokenMixer
    moe: SparseMoE | None = None
    dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    block: Callable[[torch.Tensor], torch.Tensor] | None = None  # a family's FFN half (engine/layer_blocks.py)


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
        self.rms_norm = norm_of(args)
        self.lm_head = weights["embed"] if args.tie_word_embeddings else weights["lm_head"]  # [V, H]
        self.rope = RotaryTable(args.rotary_dim, args.rope_theta, args.rope_scaling, dtype, self.device)  # [*, R]
        self.scale = args.head_dim**-0.5
        ctx = MixerContext(dtype, self.device, self.rope)
        self.layers: list[Layer] = []
        self.kv_slots: dict[int, int] = {}  # layer -> its slot of the shared KV cache (positional mixers)
        for i, kind in enumerate(args.mixers):
            p = f"layers.{i}."
            opt = lambda n: weights.get(p + n)  # noqa: E731
            cls = mixer_class(kind)
            mixer = cls.build(args, i, {n: weights[p + n] for n in cls.weight_shapes(args, i)}, ctx)
            if cls.positional:
                self.kv_slots[i] = len(self.kv_slots)
            layer = Layer(weights[p + "attn_norm"], weights[p + "ffn_norm"], mixer)
            if args.layer_block:
                layer.block = block_class(args.layer_block).build(args, i, weights, cache)
                layer.moe = layer.block.moe
            elif args.sparse_layers[i]:
                shared = None
                if args.shared_expert_intermediate_size:
                    shared = (weights[p + "shared_gate"], weights[p + "shared_up"], weights[p + "shared_down"])
                router = Router(weights[p + "router"], args.routing, bias=opt("router_bias"),
                                correction_bias=opt("router_correction_bias"))
                layer.moe = SparseMoE(i, router, None, cache, shared, opt("shared_expert_gate"))
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
        model is not all fused-capable GQA layers of plain bf16 CPU tensors (quantized GGUF attention: the GGML
        twin; float32, another device, another mixer: None)."""
        if not all(isinstance(layer.mixer, TokenMixer) and layer.mixer.fused_decode for layer in self.layers):
            return None
        if quantized := quantized_decode_kernel(self.layers, self.dtype, self.device):
            return quantized  # GGML weights (a quantized GGUF): the same call over ggml's kernels
        if self.dtype != torch.bfloat16 or self.device.type != "cpu":
            return None
        plain = lambda t: t is None or (type(t) is torch.Tensor and t.dtype == torch.bfloat16  # noqa: E731
                                        and t.is_contiguous())
        for layer in self.layers:
            m = layer.mixer
            router = layer.moe.router if layer.moe is not None else None
            if not all(plain(t) for t in (layer.attn_norm, layer.ffn_norm, m.q, m.k, m.v, m.o, m.q_bias, m.k_bias,
                                          m.v_bias, m.o_bias, m.q_norm, m.k_norm, router)):
                return None
        module = native.load("bf16_decode")
        return Bf16DecodeKernel(module) if module is not None else None

    def _decode_layer(self, layer: Layer, h: torch.Tensor, kv: KVLayer, start: int, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
        """h [1, H] -> [1, H] for one decode token at position start (cos, sin [D] its RoPE rows): attention, norms,
        router and routing in one kernel call, then the MoE."""
        a, m = self.args, layer.mixer
        moe = layer.moe
        router = moe.router if moe is not None and moe.elastic is None else None
        top_k = moe.routing.top_k if router is not None and moe.routes_in_kernel else 0
        h, r, logits, experts, weights = self._decode_kernel.attention_decode(
            h, layer.attn_norm, layer.ffn_norm, a.rms_norm_eps, m.q, m.k, m.v, m.o,
            m.q_bias, m.k_bias, m.v_bias, m.o_bias, QK_NORM_MODE[a.qk_norm], m.q_norm,
            m.k_norm, cos, sin, kv.keys, kv.values, start, self.scale, router, top_k,
            moe is not None and moe.routing.norm_topk_prob, moe is not None and moe.routing.weights_in_logits_dtype)
        if top_k:
            return moe.decode_routed(r, experts, weights, h)
        if moe is not None:
            return h + moe(r, logits=logits)
        return h + swiglu(r, *layer.dense)

    def new_state(self, max_tokens: int) -> SequenceState:
        """A fresh sequence: the attention layers' KV cache for max_tokens positions and each recurrent state."""
        a = self.args
        shapes = {type(self.layers[i].mixer).cache_shape(a) for i in self.kv_slots} or {(a.num_kv_heads, a.head_dim,
                                                                                        None)}
        if len(shapes) > 1:
            raise ValueError(f"attention layers with different KV cache shapes {sorted(shapes, key=str)}")
        (G, D, Dv), = shapes
        kv = KVCache(len(self.kv_slots), G, D, max_tokens, self.dtype, self.device, value_dim=Dv)
        return SequenceState(kv, [KVLayer(kv, self.kv_slots[i]) if i in self.kv_slots
                                  else layer.mixer.new_state(self.dtype, self.device)
                                  for i, layer in enumerate(self.layers)])

    new_kv_cache = new_state

    def _ffn(self, layer: Layer, r: torch.Tensor) -> torch.Tensor:
        return layer.moe(r) if layer.moe is not None else swiglu(r, *layer.dense)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, state: SequenceState, start: int | None = None, all_logits: bool = False):
        """tokens [T] at positions start..start+T -> logits [T, V] (all_logits) or [1, V] for the last token."""
        start = state.length if start is None else start
        a = self.args
        if self.embed_rows is not None:
            h = self.embed_rows(tokens)  # [T, H]
        else:
            h = F.embedding(tokens.to(self.device), self.embed)  # [T, H]
        if a.embed_scale is not None:  # Gemma: the multiplier rounded to the weights' dtype first, as transformers
            h = h * torch.tensor(a.embed_scale).to(h.dtype)  # float32 first, as the buffer is
        window = a.sliding_window
        fused = (self._decode_kernel is not None and tokens.shape[0] == 1 and (window is None or start < window))
        if start + tokens.shape[0] > state.max_tokens:
            raise ContextOverflow(start + tokens.shape[0], state.max_tokens)
        if fused:
            cos, sin = (t[0] for t in self.rope.get(start, 1))
            whole = getattr(self._decode_kernel, "decode_token", None)  # resident quantized GGUF: one call a token
            if whole is not None and (out := whole(self, h, state, start, cos, sin, QK_NORM_MODE[a.qk_norm])) is not None:
                return out  # logits [1, V]; state.length advanced
        for i, layer in enumerate(self.layers):
            if fused:
                h = self._decode_layer(layer, h, state[i], start, cos, sin)
                continue
            r = self.rms_norm(h, layer.attn_norm, a.rms_norm_eps)
            h = h + layer.mixer.forward(r, state[i], start)
            if layer.block is not None:
                h = layer.block(h)
                continue
            r = self.rms_norm(h, layer.ffn_norm, a.rms_norm_eps)
            h = h + self._ffn(layer, r)
        state.length = start + tokens.shape[0]
        if not all_logits:
            h = h[-1:]
        h = self.rms_norm(h, self.norm, a.rms_norm_eps)
        if isinstance(self.lm_head, PackedMatrix):
            logits = self.lm_head.linear(h, linear)  # [T|1, V], bit for bit the bf16 matrix's product
        else:
            logits = linear(h, self.lm_head)  # [T|1, V]
        if a.final_logit_softcapping is not None:
            cap = a.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits
