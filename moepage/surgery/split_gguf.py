"""`moepage split model.gguf OUT`: per-expert shards that keep the GGUF quantization (no requantization).

Layout of OUT:
  moepage.json                      {"format": "moepage-split", "source_format": "gguf", "config", "resident",
                                     "files": {rel: {"sha256", "bytes"}}, "source", "experts"}
  resident.gguf                     every metadata key (tokenizer, chat template, hyper-parameters) and every
                                    tensor except the routed experts, bytes copied as stored
  experts/L{L:03d}/E{E:04d}.safetensors   uint8 tensors gate, up, down: the expert's raw GGML bytes; the
                                    metadata holds each part's GGML type and logical shape

Restartable: each file is written under a temporary name and renamed into place, then recorded (path, sha256,
bytes) in OUT/.moepage-split.partial.jsonl. A split run again into the same OUT skips every recorded file whose
bytes still hash to the record, rewrites the rest, and deletes the journal once moepage.json is written.
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


JOURNAL = ".moepage-split.partial.jsonl"


def _journal(out_dir: str) -> dict[str, dict]:
    """rel -> {"sha256", "bytes"} of the files an interrupted split recorded (a torn last line is ignored)."""
    found = {}
    try:
        with open(os.path.join(out_dir, JOURNAL)) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    found[str(r["rel"])] = {"sha256": str(r["sha256"]), "bytes": int(r["bytes"])}
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    return found


def _still_there(out_dir: str, rel: str, meta: dict | None) -> bool:
    full = os.path.join(out_dir, rel)
    return (meta is not None and os.path.isfile(full) and os.path.getsize(full) == meta["bytes"]
            and sha256_of(full) == meta["sha256"])


def split_gguf(path: str, out_dir: str, progress=None) -> dict:
    """Split a .gguf file into OUT (see the module docstring; restartable); returns the manifest."""
    ckpt = open_gguf(path, drop_page_cache=True)
    src: GGUFFile = ckpt.gguf
    args = ckpt.args
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise CheckpointError(f"{out_dir}: already holds a split model ({MANIFEST}); choose an empty directory")
    os.makedirs(out_dir, exist_ok=True)
    done_before = _journal(out_dir)
    files: dict[str, dict] = {}
    with open(os.path.join(out_dir, JOURNAL), "a") as journal:

        def record(rel: str, write):
            if _still_there(out_dir, rel, done_before.get(rel)):
                files[rel] = done_before[rel]
                return
            full = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            write(full + ".tmp")
            os.replace(full + ".tmp", full)
            files[rel] = {"sha256": sha256_of(full), "bytes": os.path.getsize(full)}
            journal.write(json.dumps({"rel": rel, **files[rel]}) + "\n")
            journal.flush()

        record(RESIDENT, lambda to: write_resident_gguf(src, to, _expert_tensor_names(args, ckpt.expert_names)))
        total = len(args.moe_layers) * args.num_experts
        done = 0
        for layer in args.moe_layers:
            for e in range(args.num_experts):
                def write(to, layer=layer, e=e):
                    q = ckpt.experts.read_quantized(layer, e)
                    save_file({p: getattr(q, p).data.contiguous() for p in PARTS}, to, metadata=shard_metadata(q))

                record(split_shard_path(layer, e), write)
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
    os.remove(os.path.join(out_dir, JOURNAL))
    src.close()
    return manifest

