"""The token-mixer seam: one class per kind of sequence mixing a decoder layer does (config.json `layer_types`:
"full_attention" GQA, "linear_attention" Gated DeltaNet, later sliding-window, MLA...).

A mixer class declares the resident weights one layer of its kind holds (canonical names under `layers.{i}.`, with
their shapes from ModelArgs), builds itself from those weights, runs `forward(x [T, H], state, start) -> [T, H]` for
a prompt chunk and for one decode token, says whether a fused C++ decode path runs it, and sizes its per-sequence
state. Two kinds of state:
- positional (a KV cache): every positional layer of a model shares one KVCache, a slot each (KVLayer), so the
  fused decode kernels keep taking per-layer K/V views; a prefix of it is valid at any length;
- recurrent (e.g. GatedDeltaState: conv + recurrent state): one object per layer with nbytes, snapshot() and
  restore(snap); only the lengths it was copied at (SequenceState.mark) can be gone back to.

Shape legend: T tokens in this step, H hidden.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from moepage.engine.kv_cache import KVCache
from moepage.engine.model_args import ModelArgs
from moepage.kernels.rope import RotaryTable


@dataclass
class KVLayer:
    """A positional layer's state: its slot of the model's shared KV cache."""

    cache: KVCache
    slot: int

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        """k, v [1, G, T, D] at positions start..start+T -> all keys and values so far [1, G, start+T, D]."""
        return self.cache.update(self.slot, k, v, start)

    @property
    def keys(self) -> torch.Tensor:
        return self.cache.layer_k[self.slot]  # [G, S, D], the fused kernel writes into it

    @property
    def values(self) -> torch.Tensor:
        return self.cache.layer_v[self.slot]


@dataclass
class MixerContext:
    """What a mixer's build needs beyond its weights: the compute dtype and device and the model's RoPE table."""

    dtype: torch.dtype
    device: torch.device
    rope: RotaryTable | None = None


class TokenMixer(ABC):
    kind: ClassVar[str]  # the layer_types entry this class mixes
    positional: ClassVar[bool]  # its state is a KV cache slot (True) or a recurrent state object (False)
    fused_decode: bool = False  # a C++ one-token decode path runs this layer (model.py calls it)

    @classmethod
    @abstractmethod
    def weight_shapes(cls, args: ModelArgs, layer: int) -> dict[str, tuple[int, ...]]:
        """name after `layers.{layer}.` -> shape (torch order) of every resident weight of this mixer in that layer
        (optional ones, such as biases, only where args has them)."""

    @classmethod
    @abstractmethod
    def build(cls, args: ModelArgs, layer: int, weights: dict[str, torch.Tensor], ctx: MixerContext) -> "TokenMixer":
        """weights: weight_shapes(args, layer)'s names -> tensors."""

    @abstractmethod
    def forward(self, x: torch.Tensor, state, start: int) -> torch.Tensor:
        """x [T, H] (after the layer's input norm) at positions start..start+T, continuing state -> [T, H]."""

    @classmethod
    @abstractmethod
    def state_nbytes(cls, args: ModelArgs, max_tokens: int, dtype: torch.dtype) -> int:
        """Bytes one sequence's state of one such layer takes at max_tokens (no allocation)."""

    @classmethod
    def workspace_nbytes(cls, args: ModelArgs, tokens: int, positions: int, dtype: torch.dtype) -> int:
        """A bound on the bytes of tensors one such layer's forward allocates at its worst moment for a prefill chunk
        of `tokens` tokens attending up to `positions` positions, its output included (the engine's memory plan keeps
        the largest over a model's mixers out of the expert cache). This default is a softmax attention's: the q (and
        gate), k, v projections, their normed and rotated copies, the attention output and its gated copy, a bool
        [T, S] mask and the [T, H] result."""
        e = torch.empty(0, dtype=dtype).element_size()
        T, q, kv = tokens, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        proj = T * ((2 * q if args.attn_output_gate else q) + 2 * kv) * e
        rotated = 3 * T * (q + kv) * e + (8 * T * (q + kv) if args.qk_norm else 0)  # copies; float32 norm temporaries
        return proj + rotated + 3 * T * q * e + T * positions + T * args.hidden_size * e

    @classmethod
    def cache_shape(cls, args: ModelArgs) -> tuple[int, int, int | None]:
        """A positional mixer's slot of the shared KV cache: (kv heads, key width, value width; None: the key
        width, 0: keys only). Every positional layer of a model must agree."""
        return args.num_kv_heads, args.head_dim, None

    def new_state(self, dtype: torch.dtype, device) -> object:
        """A recurrent mixer's fresh state (positional mixers use a KVLayer of the shared cache instead)."""
        raise TypeError(f"{self.kind} layers keep their state in the shared KV cache")
