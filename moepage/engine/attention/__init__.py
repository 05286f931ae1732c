"""Token mixers, one class per layer_types kind (attention/base.py has the seam)."""
from __future__ import annotations

from moepage.engine.model_args import ConfigError


def mixer_class(kind: str):
    """The TokenMixer class for a layer_types entry."""
    from moepage.engine.attention.gated_delta import GatedDeltaMixer
    from moepage.engine.attention.gemma4 import Gemma4Attention, Gemma4SlidingAttention
    from moepage.engine.attention.gqa import GQA
    from moepage.engine.attention.mla import MultiLatentAttention
    from moepage.engine.attention.sliding import SlidingWindowAttention

    mixers = {GQA.kind: GQA, GatedDeltaMixer.kind: GatedDeltaMixer,
              SlidingWindowAttention.kind: SlidingWindowAttention, MultiLatentAttention.kind: MultiLatentAttention,
              Gemma4Attention.kind: Gemma4Attention, Gemma4SlidingAttention.kind: Gemma4SlidingAttention}
    if kind not in mixers:
        raise ConfigError(f"layer_types: unsupported layer kind {kind!r}; supported: {', '.join(sorted(mixers))}")
    return mixers[kind]
