"""Layer blocks: a family's own feed-forward half of every decoder layer, where it is more than the shared decoder's
`h + ffn(norm(h))` (ModelArgs.layer_block names one; None: the shared FFN). A block class declares its resident
weights (`weight_shapes(args, layer)`, beyond attn_norm, ffn_norm and the mixer's), builds from them and the expert
cache, exposes its SparseMoE as `.moe` (paging, pre-gating, stats and the elastic modes see it like any other) and maps
the residual after attention to the next layer's input: `block(h [T, H]) -> [T, H]`.

Shape legend: T tokens, H hidden.
"""
from __future__ import annotations

from moepage.engine.model_args import ConfigError


def block_class(kind: str):
    """The block class for a ModelArgs.layer_block name."""
    from moepage.engine.gemma4_block import Gemma4Block

    blocks = {Gemma4Block.kind: Gemma4Block}
    if kind not in blocks:
        raise ConfigError(f"layer_block: unknown layer block {kind!r}; known: {', '.join(sorted(blocks))}")
    return blocks[kind]
