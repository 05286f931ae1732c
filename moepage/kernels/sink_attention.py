"""Softmax attention with learned per-head sinks (gpt-oss): each head's softmax has one more logit, the sink, that
takes probability mass and attends to nothing. The ops and their dtypes are those of transformers' gpt-oss
eager_attention_forward (scores in the compute dtype, max subtracted, softmax in that dtype, sink column dropped).

Shape legend: N query heads, G kv heads, T query tokens, S keys, D head dim.
"""
from __future__ import annotations

import torch


def attend_with_sinks(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sinks: torch.Tensor, scale: float,
                      q_start: int, k_start: int, window: int | None = None) -> torch.Tensor:
    """q [1, N, T, D] at positions q_start..q_start+T; keys, values [1, G, S, D] at k_start..k_start+S; sinks [N]
    -> [1, N, T, D]. A query sees the keys at or before its position (and, with a window, fewer than `window`
    positions back)."""
    N, T = q.shape[1], q.shape[2]
    G, S = keys.shape[1], keys.shape[2]
    if N % G:
        raise ValueError(f"{N} query heads do not share {G} kv heads evenly")
    k = keys.repeat_interleave(N // G, dim=1)  # [1, N, S, D]
    v = values.repeat_interleave(N // G, dim=1)
    w = torch.matmul(q, k.transpose(2, 3)) * scale  # [1, N, T, S]
    qpos = torch.arange(q_start, q_start + T, device=q.device)[:, None]
    kpos = torch.arange(k_start, k_start + S, device=q.device)[None, :]
    hidden = kpos > qpos  # [T, S]
    if window is not None:
        hidden |= kpos <= qpos - window
    if hidden.any():
        w = w + torch.zeros(T, S, dtype=w.dtype, device=w.device).masked_fill(hidden, torch.finfo(w.dtype).min)
    sink = sinks.to(w.dtype).reshape(1, N, 1, 1).expand(1, N, T, 1)
    combined = torch.cat([w, sink], dim=-1)  # [1, N, T, S + 1]
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]  # the sink's share dropped
    return torch.matmul(probs.to(v.dtype), v)
