"""One C++ call per decode layer for models whose attention weights are GGML bytes (a quantized GGUF): the twin
of bf16_decode's attention_decode (same arguments, same results), built on ggml's CPU kernels
(csrc/ggml_cpu_decode.h).

Shape legend: R weight rows, C weight columns.
"""
from __future__ import annotations

import torch

from moepage.kernels.ggml import INTERLEAVED, backend_for, ggml_backend, interleaved_for_matvec
from moepage.kernels.ggml_linear import GGMLWeight
from moepage.kernels.ggml_token import TokenKernel

PLAIN_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}  # GGML type ids of plain matrices
MODEL_DTYPES = (torch.float32, torch.bfloat16)


def _ggml_bytes(w: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """w (a GGMLWeight or a plain 2-D matrix) -> (uint8 [R, bytes per row], GGML type id, C), or None when ggml's
    kernels cannot multiply it."""
    if isinstance(w, GGMLWeight):
        q = w.qweight
        return (q.data.view(q.shape[0], -1), q.kernel_type, q.shape[1]) if backend_for(q) is not None else None
    if type(w) is torch.Tensor and w.dim() == 2 and w.is_contiguous() and w.device.type == "cpu" \
            and w.dtype in PLAIN_TYPES:
        return w.view(torch.uint8), PLAIN_TYPES[w.dtype], w.shape[1]
    return None


class QuantizedDecodeKernel:
    """attention_decode(...) with bf16_decode's signature; each weight's bytes and type looked up once."""

    def __init__(self, module, weights: dict[int, tuple[torch.Tensor, int]]):
        self.module = module
        self.weights = weights  # id(weight tensor) -> (GGML bytes, type id)
        self.token = TokenKernel(module, weights)

    def warm(self, model) -> int:
        """After the experts are read: huge pages under the resident weights (kernels/ggml_token.py)."""
        return self.token.warm(model)

    def decode_token(self, model, h, state, start, cos, sin, qk_norm_mode):
        """Every layer, the final norm and the lm_head in one call (kernels/ggml_token.py): logits [1, V], or None
        where the per-layer path runs."""
        return self.token.decode(model, h, state, start, cos, sin, qk_norm_mode)

    def attention_decode(self, h, attn_norm, ffn_norm, eps, wq, wk, wv, wo, bq, bk, bv, bo, qk_norm_mode, q_norm,
                         k_norm, cos, sin, k_cache, v_cache, pos, scale, router, top_k, norm_topk_prob,
                         weights_in_logits_dtype):
        w = self.weights
        router = getattr(router, "weight", router)  # a Router object or its weight
        r, tr = w[id(router)] if router is not None else (None, 0)
        return self.module.attention_decode(h, attn_norm, ffn_norm, eps, *w[id(wq)], *w[id(wk)], *w[id(wv)],
                                            *w[id(wo)], bq, bk, bv, bo, qk_norm_mode, q_norm, k_norm, cos, sin,
                                            k_cache, v_cache, pos, scale, r, tr, top_k, norm_topk_prob,
                                            weights_in_logits_dtype)


def quantized_decode_kernel(layers, dtype: torch.dtype, device: torch.device) -> QuantizedDecodeKernel | None:
    """The kernel for a model whose layers (model.Layer: norms, moe.router; its GQA mixer: q, k, v, o, biases) hold
    GGML weights ggml's kernels multiply and plain CPU tensors of the model dtype elsewhere; None otherwise. The GGML
    matrices are put in ggml's interleaved layout where this CPU has a faster kernel for it (every use of them reads
    it)."""
    b = ggml_backend()
    if b is None or dtype not in MODEL_DTYPES or device.type != "cpu":
        return None
    matrices: list[torch.Tensor] = []
    for layer in layers:
        m = layer.mixer  # attention.gqa.GQA
        router = getattr(layer.moe.router, "weight", layer.moe.router) if layer.moe is not None else None
        for t in (m.q, m.k, m.v, m.o) + ((router,) if isinstance(router, torch.Tensor) else ()):
            raw = _ggml_bytes(t)
            if raw is None or raw[2] % b.activation_block(raw[1] & ~INTERLEAVED):
                return None
            matrices.append(t)
        for t in (layer.attn_norm, layer.ffn_norm, m.q_bias, m.k_bias, m.v_bias, m.o_bias, m.q_norm, m.k_norm):
            if t is not None and not (type(t) is torch.Tensor and t.dtype == dtype and t.is_contiguous()):
                return None
    if not any(isinstance(t, GGMLWeight) for t in matrices):
        return None
    shared = [t for layer in layers if layer.moe is not None and layer.moe.shared is not None
              for t in layer.moe.shared]  # a shared expert's matrices (Qwen2-MoE): only ever multiplied too
    for t in matrices + shared:
        if isinstance(t, GGMLWeight):
            t.qweight = interleaved_for_matvec(t.qweight)  # in place: the GGMLWeight's bytes are the same memory
    return QuantizedDecodeKernel(b.module, {id(t): _ggml_bytes(t)[:2] for t in matrices})
