"""Causal softmax attention of a prompt chunk over the keys before it and its own, in torch's fused CPU
flash-attention kernel: the queries at positions q_start.. see the keys at or before their own position (and, with
a window, fewer than `window` positions back), given as one [T, S] 0 / -inf bias (the one SDPA makes of a bool
mask) that the kernel applies block by block, so the [N, T, S] scores are never held. SDPA's math path holds them (float32, and again for the softmax:
330 MB a layer for a 512-token chunk over 10k keys and 16 heads, 2.7 GB with DeepSeek-V3's 128 heads), and SDPA
falls back to it silently for any input its fused kernel refuses: MLA's keys are wider than its values, so MLA
took it until the values were padded to the keys' width here. The kernel's op is called directly, so a shape it
cannot take fails loudly instead of quietly costing the memory the budget does not hold, and no process-wide
backend switch (`sdpa_kernel`) is flipped under the other threads' attention. One call per chunk, its order of
sums fixed by the chunk's shape: a chunk computes the same values whether its keys came from a fresh prefill or a
re-used prefix (engine/prompt_cache.py).

Shape legend: N query heads, G kv heads, T query tokens, S keys, D key width, Dv value width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def chunk_mask(q_start: int, T: int, k_start: int, S: int, window: int | None, device) -> torch.Tensor:
    """[T, S] bool: query t (position q_start + t) sees key s (position k_start + s)."""
    qpos = torch.arange(q_start, q_start + T, device=device)[:, None]
    kpos = torch.arange(k_start, k_start + S, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def attend_chunk(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_start: int, k_start: int,
                 scale: float, window: int | None = None) -> torch.Tensor:
    """q [1, N, T, D] at positions q_start..q_start+T; keys [1, G, S, D], values [1, G, S, Dv] at k_start.. ->
    [1, N, T, Dv]. Query head n uses kv head n // (N / G)."""
    N, T, G, S = q.shape[1], q.shape[2], keys.shape[1], keys.shape[2]
    D, Dv = q.shape[3], values.shape[3]
    if N % G:
        raise ValueError(f"{N} query heads do not share {G} kv heads evenly")
    mask = chunk_mask(q_start, T, k_start, S, window, q.device)
    if q.device.type != "cpu":  # other devices' fused kernels take other masks: SDPA picks
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=N != G)
    if Dv < D:  # the flash kernel wants one head width: zero columns add nothing to the other columns' sums
        values = F.pad(values, (0, D - Dv))
    elif Dv > D:  # nor do zero products to a score
        q, keys = F.pad(q, (0, Dv - D)), F.pad(keys, (0, Dv - D))
    bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))  # as SDPA turns a bool mask
    out = _FLASH_CPU(q, keys, values, 0.0, False, attn_mask=bias, scale=scale)[0]
    return out[..., :Dv] if Dv < D else out
