"""Sliding-window attention layers ("sliding_attention" in config.json layer_types: gpt-oss, alternating with full
layers): GQA whose queries see only the last `window` positions, so its state is the keys and values of the last
window - 1 positions, not a KV cache that grows with the context. That state is what the memory budget counts.

Shape legend: T tokens in this step, H hidden, G kv heads, D head dim, P cached positions (at most window - 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moepage.engine.attention.base import MixerContext
from moepage.engine.attention.gqa import GQA
from moepage.engine.model_args import ModelArgs
from moepage.kernels.chunk_attention import attend_chunk
from moepage.kernels.sink_attention import attend_with_sinks


@dataclass
class WindowState:
    """One sequence's keys and values in one sliding layer: the last positions before `tokens`, [1, G, P, D] each."""

    k: torch.Tensor
    v: torch.Tensor
    tokens: int = 0  # positions seen

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def snapshot(self) -> "WindowState":
        """A copy later updates do not touch (the prompt cache's)."""
        return WindowState(self.k.clone(), self.v.clone(), self.tokens)

    def restore(self, snap: "WindowState") -> None:
        if snap.k.shape[:2] != self.k.shape[:2] or snap.k.shape[3] != self.k.shape[3]:
            raise ValueError("a sliding-window snapshot of another layer shape cannot be restored here")
        self.k, self.v, self.tokens = snap.k.clone(), snap.v.clone(), snap.tokens


class SlidingWindowAttention(GQA):
    kind: ClassVar[str] = "sliding_attention"
    positional: ClassVar[bool] = False  # its own bounded state, not a slot of the growing KV cache

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], ctx: MixerContext):
        super().__init__(args, weights, ctx)
        if args.sliding_attention_window is None:
            raise ValueError("sliding_attention layers need sliding_attention_window")
        self.window = args.sliding_attention_window
        self.fused_decode = False  # torch ops; the bf16/GGML decode kernels read a KV cache slot

    @classmethod
    def build(cls, args: ModelArgs, layer: int, weights: dict[str, torch.Tensor], ctx: MixerContext):
        return cls(args, weights, ctx)

    @classmethod
    def state_nbytes(cls, args: ModelArgs, max_tokens: int, dtype: torch.dtype) -> int:
        kept = min(max_tokens, (args.sliding_attention_window or 1) - 1)
        return 2 * args.num_kv_heads * kept * args.head_dim * torch.empty(0, dtype=dtype).element_size()

    def new_state(self, dtype: torch.dtype, device) -> WindowState:
        a = self.args
        empty = torch.empty(1, a.num_kv_heads, 0, a.head_dim, dtype=dtype, device=device)
        return WindowState(empty, empty.clone())

    def forward(self, x: torch.Tensor, state: WindowState, start: int) -> torch.Tensor:
        if start != state.tokens:
            raise ValueError(f"sliding-window state holds {state.tokens} positions, asked to continue at {start}")
        return super().forward(x, state, start)

    def _cache(self, state: WindowState, k: torch.Tensor, v: torch.Tensor, start: int):
        """The kept keys and values followed by k, v [1, G, T, D]: ([1, G, P + T, D] x2, position of the first);
        the state keeps the last window - 1 of them."""
        keys = torch.cat([state.k, k], dim=2)
        values = torch.cat([state.v, v], dim=2)
        first = start - state.k.shape[2]
        keep = min(self.window - 1, keys.shape[2])
        state.k = keys[:, :, keys.shape[2] - keep:].contiguous()
        state.v = values[:, :, values.shape[2] - keep:].contiguous()
        state.tokens = start + k.shape[2]
        return keys, values, first

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                k_start: int = 0) -> torch.Tensor:
        if self.sinks is not None:
            return attend_with_sinks(q, keys, values, self.sinks, self.scale, start, k_start, self.window)
        return attend_chunk(q, keys, values, start, k_start, self.scale, self.window)
