"""`moepage split model.gguf OUT`: per-expert shards that keep the GGUF quantization (no requantization).

Layout of OUT:
  moepage.json                      {"format": "moepage-split", "source_format": "gguf", "config", "resident",
                                     "files": {rel: {"sha256", "bytes"}}, "source", "experts"}
  resident.gguf                     every metadata key (tokenizer, chat template, hyper-parameters) and every
                                    tensor except the routed experts, bytes copied as stored
  experts/L{L:03d}/E{E:04d}.safetensors   uint8 tensors gate, up, down: the expert's raw GGML bytes; the
                                    metadata holds each part's GGML type and logical shape
"""
from __future__ import annotations

import json
import os

from safetensors.torch import save_file

from moepage.engine.checkpoint import MANIFEST, split_shard_path
from moepage.engine.gguf_checkpoint import open_gguf
from moepage.paging.gguf_experts import PARTS, shard_metadata
from moepage.paging.gguf_file import GGUFFile
from moepage.paging.gguf_resident import write_resident_gguf
from moepage.paging.safetensors_file import CheckpointError
from moepage.paging.sources import sha256_of

RESIDENT = "resident.gguf"


def _expert_tensor_names(args, table: dict[str, str]) -> set[str]:
    """The routed-expert tensors (the family's gguf_expert_names: gate/up/down, or Gemma 4's fused gate_up/down)."""
    return {t.format(L=layer) for layer in args.moe_layers for t in table.values()}


def split_gguf(path: str, out_dir: str, progress=None) -> dict:
    """Split a .gguf file into OUT (see the module docstring); returns the manifest."""
    ckpt = open_gguf(path, drop_page_cache=True)
    src: GGUFFile = ckpt.gguf
    args = ckpt.args
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise CheckpointError(f"{out_dir}: already holds a split model ({MANIFEST}); choose an empty directory")
    os.makedirs(out_dir, exist_ok=True)
    write_resident_gguf(src, os.path.join(out_dir, RESIDENT), _expert_tensor_names(args, ckpt.expert_names))
    files = {RESIDENT: {"sha256": sha256_of(os.path.join(out_dir, RESIDENT)),
                        "bytes": os.path.getsize(os.path.join(out_dir, RESIDENT))}}
    total = len(args.moe_layers) * args.num_experts
    done = 0
    for layer in args.moe_layers:
        for e in range(args.num_experts):
            q = ckpt.experts.read_quantized(layer, e)
            rel = split_shard_path(layer, e)
            full = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            save_file({p: getattr(q, p).data.contiguous() for p in PARTS}, full, metadata=shard_metadata(q))
            files[rel] = {"sha256": sha256_of(full), "bytes": os.path.getsize(full)}
            done += 1
            if progress:
                progress(done, total)
    manifest = {
        "format": "moepage-split",
        "source_format": "gguf",
        "version": 1,
        "source": os.path.abspath(path),
        "config": ckpt.config,
        "resident": RESIDENT,
        "experts": {"layout": "experts/L{layer:03d}/E{expert:04d}.safetensors", "parts": list(PARTS),
                    "moe_layers": args.moe_layers, "num_experts": args.num_experts},
        "files": files,
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    src.close()
    return manifest

