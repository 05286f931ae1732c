"""Canonical weight names of a model instance and their translation through a family's table."""
from __future__ import annotations

import re

from moepage.engine.model_args import ModelArgs

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def resident_names(args: ModelArgs) -> list[str]:
    """Every canonical name the runtime keeps resident (all but routed experts)."""
    from moepage.engine.attention import mixer_class

    names = ["embed", "norm"]
    if not args.tie_word_embeddings:
        names.append("lm_head")
    for i, kind in enumerate(args.mixers):
        p = f"layers.{i}."
        names += [p + "attn_norm", p + "ffn_norm"] + [p + n for n in mixer_class(kind).weight_shapes(args, i)]
        if args.layer_block:  # a family's own FFN half (engine/layer_blocks.py) declares the rest
            from moepage.engine.layer_blocks import block_class

            names += [p + n for n in block_class(args.layer_block).weight_shapes(args, i)]
            continue
        if args.sparse_layers[i]:
            names.append(p + "router")
            if args.router_bias:
                names.append(p + "router_bias")
            if args.router_correction_bias:
                names.append(p + "router_correction_bias")
            if args.shared_expert_intermediate_size:
                names += [p + "shared_gate", p + "shared_up", p + "shared_down"]
                if args.shared_expert_gate:
                    names.append(p + "shared_expert_gate")
        else:
            names += [p + "dense_gate", p + "dense_up", p + "dense_down"]
    return names


def resident_dtype(args: ModelArgs, canonical: str, dtype):
    """The dtype the engine holds resident tensor `canonical` in: `dtype`, except a float32-logits router's weight
    and correction bias (DeepSeek-V3, GLM-4.5: transformers keeps them float32 and the published bias is float32)."""
    import torch

    last = canonical.rsplit(".", 1)[-1]
    if args.routing.logits_in_float32 and last in ("router", "router_correction_bias"):
        return torch.float32
    m = _LAYER.match(canonical)
    if last in ("kv_b", "k_b", "v_b") and m and args.mixers[int(m.group(1))] == "mla":
        return torch.float32  # the absorbed decode multiplies them in float32 every token (attention/mla.py)
    return dtype


def to_checkpoint(table: dict[str, str], canonical: str) -> str:
    """'layers.3.q' -> 'model.layers.3.self_attn.q_proj.weight' using a family table."""
    if canonical in table:
        return table[canonical]
    m = _LAYER.match(canonical)
    if m and f"layers.{{L}}.{m.group(2)}" in table:
        return table[f"layers.{{L}}.{m.group(2)}"].format(L=m.group(1))
    raise KeyError(f"no checkpoint name for {canonical!r}")


def expert_names(table: dict[str, str], layer: int, expert: int) -> dict[str, str]:
    """{'gate': name, 'up': name, 'down': name} for one routed expert."""
    return {part: t.format(L=layer, E=expert) for part, t in table.items()}
