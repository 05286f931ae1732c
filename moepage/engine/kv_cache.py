"""Preallocated KV cache for one sequence.

Shape legend: L layers, G kv heads, S max tokens, D head dim, T new tokens.
"""
from __future__ import annotations

import torch


class ContextOverflow(ValueError):
    def __init__(self, needed: int, limit: int):
        super().__init__(f"sequence of {needed} tokens exceeds the KV cache of {limit} tokens")
        self.needed = needed
        self.limit = limit


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int, dtype, device="cpu"):
        self.max_tokens = int(max_tokens)
        # [L, 1, G, S, D]; torch.empty does not touch pages until tokens are written.
        self.k = torch.empty(num_layers, 1, num_kv_heads, self.max_tokens, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.layer_k = [self.k[i, 0] for i in range(num_layers)]  # [G, S, D] views, for the decode kernel
        self.layer_v = [self.v[i, 0] for i in range(num_layers)]
        self.length = 0  # tokens stored (valid for every layer after a full forward)

    @staticmethod
    def bytes_for(num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int, dtype) -> int:
        return 2 * num_layers * num_kv_heads * max_tokens * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """k, v [1, G, T, D] written at positions start..start+T; returns views [1, G, start+T, D]."""
        end = start + k.shape[2]
        if end > self.max_tokens:
            raise ContextOverflow(end, self.max_tokens)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def truncate(self, length: int):
        self.length = min(self.length, length)
