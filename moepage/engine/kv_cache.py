"""Preallocated KV cache for one sequence, with snapshots of a prefix for the prompt cache.

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
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int, dtype, device="cpu",
                 value_dim: int | None = None):
        """value_dim: the values' width (None: head_dim; 0: keys only, as MLA's latent cache, whose values are a
        view of its keys)."""
        self.max_tokens = int(max_tokens)
        # [L, 1, G, S, D]; torch.empty does not touch pages until tokens are written.
        self.k = torch.empty(num_layers, 1, num_kv_heads, self.max_tokens, head_dim, dtype=dtype, device=device)
        dv = head_dim if value_dim is None else value_dim
        self.v = torch.empty(num_layers, 1, num_kv_heads, self.max_tokens, dv, dtype=dtype, device=device) \
            if dv else None
        self.layer_k = [self.k[i, 0] for i in range(num_layers)]  # [G, S, D] views, for the decode kernel
        self.layer_v = [self.v[i, 0] for i in range(num_layers)] if self.v is not None else [None] * num_layers
        self.length = 0  # tokens stored (valid for every layer after a full forward)

    @staticmethod
    def bytes_for(num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int, dtype,
                  value_dim: int | None = None) -> int:
        dv = head_dim if value_dim is None else value_dim
        return num_layers * num_kv_heads * max_tokens * (head_dim + dv) * torch.empty(0, dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor | None, start: int):
        """k, v [1, G, T, D] written at positions start..start+T; returns views [1, G, start+T, D] (v None in a
        keys-only cache)."""
        end = start + k.shape[2]
        if end > self.max_tokens:
            raise ContextOverflow(end, self.max_tokens)
        self.k[layer, :, :, start:end] = k
        if self.v is None:
            return self.k[layer, :, :, :end], None
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def truncate(self, length: int):
        self.length = min(self.length, length)

    def mark(self, length: int):
        """The state after `length` tokens may be snapshot later: positions stay where they are, nothing to copy."""

    def snapshot(self, length: int) -> "KVSnapshot":
        """A copy of the keys and values of the first `length` positions (for the prompt cache)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot snapshot {length} positions of a KV cache holding {self.length}")
        v = None if self.v is None else self.v[:, :, :, :length].clone()
        return KVSnapshot(self.k[:, :, :, :length].clone(), v, length)

    def rewind(self, length: int) -> int:
        """Keep the first `length` positions (any length: positions do not change)."""
        self.length = min(self.length, length)
        return self.length

    def restore(self, snap: "KVSnapshot", length: int) -> int:
        """Put the snapshot's first `length` positions back (the snapshot stays as it is); the cache then holds
        exactly those."""
        same_v = (snap.v is None) == (self.v is None) and (self.v is None or snap.v.shape[4] == self.v.shape[4])
        if snap.k.shape[:3] != self.k.shape[:3] or snap.k.shape[4] != self.k.shape[4] or snap.k.dtype != self.k.dtype \
                or not same_v:
            raise ValueError("a KV snapshot of another model shape cannot be restored here")
        n = min(length, snap.length)
        if n > self.max_tokens:
            raise ContextOverflow(n, self.max_tokens)
        self.k[:, :, :, :n] = snap.k[:, :, :, :n]
        if self.v is not None:
            self.v[:, :, :, :n] = snap.v[:, :, :, :n]
        self.length = n
        return n


class KVSnapshot:
    """Keys and values [L, 1, G, length, D] of a sequence's first `length` positions."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int):
        self.k, self.v, self.length = k, v, length

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)
