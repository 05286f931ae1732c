"""Gated DeltaNet math (Qwen3.5/3.6 MoE, Qwen3-Next linear attention) for one sequence.

The same ops as transformers' torch reference (`torch_causal_conv1d_update`/`causal_conv1d_fn`,
`torch_chunk_gated_delta_rule`, `torch_recurrent_gated_delta_rule`, `RMSNormGated`), without the batch dimension.
The recurrent state S [Hv, Dk, Dv] of each value head evolves per token as
    S = exp(g) S;  S = S + k (beta (v - S^T k))^T;  out = S^T q
with q, k l2-normalised and q scaled by Dk^-0.5.

Shape legend: T tokens, C conv channels, W conv kernel width, Hk key heads, Hv value heads (a multiple of Hk),
Dk key head dim, Dv value head dim, N chunks, L chunk length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, C] (inputs in time order), weight [C, W], state [W-1, C] (the inputs before x; zeros at the start) ->
    silu(depthwise causal conv) [T, C] in x's dtype, and the new state [W-1, C] (the last W-1 inputs)."""
    T, C = x.shape
    full = torch.cat([state.to(x.dtype), x], dim=0)  # [W-1+T, C]
    out = F.conv1d(full.t().unsqueeze(0).to(weight.dtype), weight.unsqueeze(1), groups=C)  # [1, C, T]
    return F.silu(out[0].t()).to(x.dtype), full[full.shape[0] - state.shape[0]:]


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _heads_first(q, k, v, g, beta):
    """Float32 [Hv, T, D] (q, k repeated over the value heads each key head serves), l2-normed q, k, q scaled."""
    Hk, Hv = k.shape[1], v.shape[1]
    if Hk != Hv:
        q, k = q.repeat_interleave(Hv // Hk, dim=1), k.repeat_interleave(Hv // Hk, dim=1)
    q, k, v, g, beta = (t.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
                        for t in (q, k, v, g, beta))
    q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           state: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt: q, k [T, Hk, Dk], v [T, Hv, Dv], g (log decay, <= 0) and beta [T, Hv], state [Hv, Dk, Dv] ->
    out [T, Hv, Dv] (q's dtype) and the state after the last token (float32)."""
    T = q.shape[0]
    out_dtype = q.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)  # [Hv, T, D], g and beta [Hv, T]
    pad = (chunk - T % chunk) % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    Hv = v.shape[0]
    k_beta, v_beta = k * beta.unsqueeze(-1), v * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (t.reshape(Hv, -1, chunk, t.shape[-1]) for t in (q, k, k_beta, v_beta))  # [Hv, N, L, D]
    decay = g.reshape(Hv, -1, chunk).cumsum(dim=-1)  # [Hv, N, L]: log decay from the chunk start
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    pairwise = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()  # [Hv, N, L, L]
    system = (k_beta @ k.transpose(-1, -2)) * pairwise
    intra = (q @ k.transpose(-1, -2)) * pairwise
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(system, k_beta * decay.exp().unsqueeze(-1), upper=False,
                                               unitriangular=True)
    s = state.to(new_values)
    out = torch.zeros_like(new_values)  # [Hv, N, L, Dv]
    q = q * decay.exp().unsqueeze(-1)
    k = k * (decay[..., -1:] - decay).exp().unsqueeze(-1)
    chunk_decay = decay[..., -1].exp()[..., None, None]  # [Hv, N, 1, 1]
    for i in range(decay.shape[1]):
        v_new = new_values[:, i] - k_cumdecay[:, i] @ s
        out[:, i] = q[:, i] @ s + intra[:, i] @ v_new
        s = s * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_new
    out = out.reshape(Hv, -1, out.shape[-1])[:, :T]
    return out.transpose(0, 1).to(out_dtype, memory_format=torch.contiguous_format), s


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token (decode): the arguments and results of chunk_gated_delta_rule."""
    out_dtype = q.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    s = state.to(v)
    out = torch.zeros_like(v)  # [Hv, T, Dv]
    for t in range(v.shape[1]):
        s = s * g[:, t].exp()[:, None, None]
        delta = (v[:, t] - (s * k[:, t].unsqueeze(-1)).sum(dim=-2)) * beta[:, t].unsqueeze(-1)  # [Hv, Dv]
        s = s + k[:, t].unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, t] = (s * q[:, t].unsqueeze(-1)).sum(dim=-2)
    return out.transpose(0, 1).contiguous().to(out_dtype), s


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token (T = 1): recurrent_gated_delta_rule's arguments and results, the update in C++
    (csrc/gated_delta_core.h, the same operations in the same order) where the module runs, on `state` in place when
    it is a contiguous float32 tensor; the torch step otherwise."""
    from moepage.kernels import native

    module = native.load("gated_delta") if q.shape[0] == 1 else None
    if module is None or state.dtype != torch.float32 or not state.is_contiguous() or state.device.type != "cpu":
        return recurrent_gated_delta_rule(q, k, v, g, beta, state)
    out_dtype = q.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)  # [Hv, 1, D], g and beta [Hv, 1]
    out = torch.empty(v.shape[0], v.shape[2], dtype=torch.float32)
    module.step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0].exp(), beta[:, 0].contiguous(), out)
    return out.unsqueeze(0).to(out_dtype), state


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, gate [..., Dv] -> w * rmsnorm(x) * silu(gate) (plain w, not 1 + w), in x's dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(dtype) * F.silu(gate.to(torch.float32))).to(dtype)
