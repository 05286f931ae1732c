"""SequenceState: one sequence's state for a whole model, what the engine and the prompt cache hold.

The positional (attention) layers share one KVCache, a slot each, so the fused decode kernels keep taking per-layer
K/V views; every recurrent layer (Gated DeltaNet) has its own state object. The prompt cache's protocol (mark,
snapshot, restore, rewind; prompt_cache.LayerStates) holds: a prefix of the KV cache is valid at any length, a
recurrent state at the lengths mark() kept copies at (the engine marks each whole prefill chunk; the prompt cache
picks which copies stay), at the current length (snapshot only) and at 0.
"""
from __future__ import annotations

import torch

from moepage.engine.attention import mixer_class
from moepage.engine.attention.base import KVLayer
from moepage.engine.kv_cache import KVCache
from moepage.engine.model_args import ModelArgs
from moepage.engine.prompt_cache import LayerStates


class SequenceState(LayerStates):
    def __init__(self, kv: KVCache, layers: list):
        """kv: the positional layers' cache; layers: each layer's state (a KVLayer of kv, or a recurrent state)."""
        self.kv = kv
        self.per_layer = layers
        super().__init__([kv] + [s for s in layers if not isinstance(s, KVLayer)])

    @property
    def length(self) -> int:
        return self.kv.length

    @length.setter
    def length(self, n: int):
        self.kv.length = n

    @property
    def max_tokens(self) -> int:
        return self.kv.max_tokens

    def __getitem__(self, layer: int):
        return self.per_layer[layer]


def state_nbytes(args: ModelArgs, max_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of one sequence's SequenceState at max_tokens positions: KV of the attention layers plus every recurrent
    layer's state (which does not grow with the length)."""
    return sum(mixer_class(kind).state_nbytes(args, max_tokens, dtype) for kind in args.mixers)


def sequence_nbytes(args: ModelArgs, max_tokens: int, dtype: torch.dtype) -> int:
    """What one sequence slot holds: its state plus the copy of every non-positional layer's state (recurrent,
    sliding window) kept at its newest chunk end, which cannot be rewound to (prompt_cache.LayerStates.mark)."""
    copies = sum(mixer_class(kind).state_nbytes(args, max_tokens, dtype) for kind in args.mixers
                 if not mixer_class(kind).positional)
    return state_nbytes(args, max_tokens, dtype) + copies
