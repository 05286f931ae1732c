"""Write a smaller MoE of the same architecture that keeps only chosen experts of each layer.

Router rows of dropped experts are removed (kept experts stay in their original relative order, so with every
expert kept the model is bit-identical), experts are renumbered 0..N-1, and config.json gets the new expert
count with top-k clamped to it.

Shape legend: E experts, N kept experts, H hidden.
"""
from __future__ import annotations

import copy
import os
import re

from moepage.engine.checkpoint import Checkpoint
from moepage.engine.weight_names import expert_names
from moepage.progress import bar
from moepage.surgery.checkpoint_writer import ShardedWriter, copy_tokenizer, experts_config_key, write_json

_ROUTER = re.compile(r"^layers\.(\d+)\.router$")


def check_kept(ckpt: Checkpoint, kept: dict[int, list[int]]) -> int:
    """Validate {layer: expert indices}; returns N (the same for every layer, as HF configs require)."""
    args = ckpt.args
    if sorted(kept) != list(args.moe_layers):
        raise ValueError(f"experts to keep are given for layers {sorted(kept)}, the model's MoE layers are {args.moe_layers}")
    sizes = {len(v) for v in kept.values()}
    if len(sizes) != 1:
        raise ValueError(f"every layer must keep the same number of experts (a config.json has one count), got {sorted(sizes)}")
    for layer, experts in kept.items():
        if len(set(experts)) != len(experts) or any(not 0 <= e < args.num_experts for e in experts):
            raise ValueError(f"layer {layer}: invalid expert indices {experts} (model has {args.num_experts})")
    n = sizes.pop()
    if n < 1:
        raise ValueError("keep at least one expert per layer")
    return n


def extracted_config(config: dict, n: int, family=None) -> dict:
    """config with N experts per layer; a multimodal wrapper's counts live in its text config (FamilySpec.layout)."""
    out = copy.deepcopy(config)
    key = family.layout(config).text_config if family is not None else None
    text = out[key] if key else out
    text[experts_config_key(text)] = n
    text["num_experts_per_tok"] = min(int(text["num_experts_per_tok"]), n)
    return out


def write_extracted_moe(ckpt: Checkpoint, kept: dict[int, list[int]], out_dir: str,
                        max_shard_bytes: int | None = None) -> dict:
    """Write the smaller MoE into out_dir (which must exist and be empty). Returns a summary dict."""
    n = check_kept(ckpt, kept)
    writer = ShardedWriter(out_dir, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
    for canonical, name in ckpt.resident_checkpoint_names().items():
        tensor = ckpt.read_tensor(name)
        router = _ROUTER.match(canonical)
        if router:
            tensor = tensor[kept[int(router.group(1))]]  # [E, H] -> [N, H]
        writer.add(name, tensor)
    table = ckpt.expert_names
    for layer in bar(ckpt.args.moe_layers, desc=f"write {os.path.basename(out_dir)}", unit="layer"):
        for new, old in enumerate(kept[layer]):
            w = ckpt.experts.read(layer, old)
            names = expert_names(table, layer, new)
            for part in ("gate", "up", "down"):
                writer.add(names[part], getattr(w, part))
    files = writer.close()
    write_json(os.path.join(out_dir, "config.json"), extracted_config(ckpt.config, n, ckpt.family))
    copy_tokenizer(ckpt.root, out_dir)
    return {"kind": "moe", "experts_per_layer": n, "top_k": min(ckpt.args.top_k, n), "files": files,
            "bytes": writer.total_bytes, "kept": {str(k): v for k, v in sorted(kept.items())}}
