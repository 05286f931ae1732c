"""Gated DeltaNet math (Qwen3.5/3.6 MoE, Qwen3-Next linear attention) for one sequence.

The same ops as transformers' torch reference (`torch_causal_conv1d_update`/`causal_conv1d_fn`,
`torch_chunk_gated_delta_rule`, `torch_recurrent_gated_delta_rule`, `RMSNormGated`), without the batch dimension.
The recurrent state S [Hv, Dk, Dv] of each value head evolves per token as
    S = exp(g) S;  S = S + k (beta (v - S^T k))^T;  out = S^T q
with q, k l2-normalised and q scaled by Dk^-0.5.

Shape legend: T tokens, C conv channels, W conv kernel width, Hk key heads, Hv value heads (a multiple of Hk),
Dk key head dim, Dv value head dim, L block length (the chunk rule's `chunk`), R rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                  block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, C] (inputs in time order), weight [C, W], state [W-1, C] (the inputs before x; zeros at the start) ->
    silu(depthwise causal conv) [T, C] in x's dtype, and the new state [W-1, C] (the last W-1 inputs, a tensor of its
    own). Computed `block` rows at a time into the one output, so the temporaries are a block's, not the chunk's."""
    T, C = x.shape
    W1 = state.shape[0]
    out = torch.empty(T, C, dtype=x.dtype, device=x.device)
    prev = state.to(x.dtype)
    for r0 in range(0, T, block):
        full = torch.cat([prev, x[r0:r0 + block]], dim=0)  # [W-1+L, C]
        conv = F.conv1d(full.t().unsqueeze(0).to(weight.dtype), weight.unsqueeze(1), groups=C)  # [1, C, L]
        out[r0:r0 + block] = F.silu(conv[0].t())
        prev = full[full.shape[0] - W1:]
    return out, prev.clone()


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _heads_first(q, k, v, g, beta, tiled: bool = False):
    """Float32 [Hv, T, D] (q, k repeated over the value heads each key head serves: value head h reads key head
    h // (Hv/Hk), or h % Hk where tiled), l2-normed q, k, q scaled."""
    Hk, Hv = k.shape[1], v.shape[1]
    if Hk != Hv and tiled:
        q, k = q.repeat(1, Hv // Hk, 1), k.repeat(1, Hv // Hk, 1)
    elif Hk != Hv:
        q, k = q.repeat_interleave(Hv // Hk, dim=1), k.repeat_interleave(Hv // Hk, dim=1)
    q, k, v, g, beta = (t.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
                        for t in (q, k, v, g, beta))
    q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           state: torch.Tensor, chunk: int = 64,
                           tiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt: q, k [T, Hk, Dk], v [T, Hv, Dv], g (log decay, <= 0) and beta [T, Hv], state [Hv, Dk, Dv] ->
    out [T, Hv, Dv] (q's dtype) and the state after the last token (float32). tiled: as _heads_first's.

    One block of L = `chunk` tokens at a time (the last one padded with zeros): its float32 heads-first
    q, k, v, decays, [Hv, L, L] pairwise/system/intra matrices and solves are made, used and dropped inside the loop,
    and its outputs written into the one [T, Hv, Dv] result, so the temporaries are one block's whatever T is. The
    same operations per block as transformers' torch_chunk_gated_delta_rule (bit for bit the rule that did every
    block at once and batched their matmuls, at the lengths tried: docs/agent-serving.md)."""
    T = q.shape[0]
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)  # [T, Hv, Dv]
    s = state.to(torch.float32)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        qb, kb, vb, gb, bb = _heads_first(q[r0:r1], k[r0:r1], v[r0:r1], g[r0:r1], beta[r0:r1], tiled)
        if r1 - r0 < chunk:  # the last block padded with zeros as the whole-chunk rule pads (the same rounding)
            pad = chunk - (r1 - r0)
            qb, kb, vb = (F.pad(t, (0, 0, 0, pad)) for t in (qb, kb, vb))
            gb, bb = (F.pad(t, (0, pad)) for t in (gb, bb))
        k_beta, v_beta = kb * bb.unsqueeze(-1), vb * bb.unsqueeze(-1)
        del vb
        decay = gb.cumsum(dim=-1)  # [Hv, L]: log decay from the block start
        pairwise = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
        system = (k_beta @ kb.transpose(-1, -2)) * pairwise  # [Hv, L, L]
        intra = (qb @ kb.transpose(-1, -2)) * pairwise
        del pairwise
        new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
        k_cumdecay = torch.linalg.solve_triangular(system, k_beta * decay.exp().unsqueeze(-1), upper=False,
                                                   unitriangular=True)
        del system, k_beta, v_beta
        v_new = new_values - k_cumdecay @ s  # [Hv, L, Dv]
        del new_values, k_cumdecay
        out[r0:r1] = ((qb * decay.exp().unsqueeze(-1)) @ s + intra @ v_new)[:, :r1 - r0].transpose(0, 1)
        del qb, intra
        last = decay[:, -1:]  # [Hv, 1]
        s = s * last.exp().unsqueeze(-1) + (kb * (last - decay).exp().unsqueeze(-1)).transpose(-1, -2) @ v_new
    return out, s


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


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   block: int | None = None) -> torch.Tensor:
    """x, gate [..., Dv] -> w * rmsnorm(x) * silu(gate) (plain w, not 1 + w), in x's dtype. block: x, gate [R, Dv]
    done `block` rows at a time into one output (each row's result is the same; the float32 temporaries a block's)."""
    if block is not None and x.shape[0] > block:
        out = torch.empty_like(x)
        for r0 in range(0, x.shape[0], block):
            out[r0:r0 + block] = gated_rms_norm(x[r0:r0 + block], gate[r0:r0 + block], weight, eps)
        return out
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(dtype) * F.silu(gate.to(torch.float32))).to(dtype)
