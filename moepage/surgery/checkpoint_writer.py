"""Write a standard Hugging Face safetensors checkpoint: shards + index, config.json, tokenizer files."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from moepage.engine.checkpoint import TOKENIZER_FILES

DEFAULT_SHARD_BYTES = 2 << 30


def prepare_output_dir(out_dir: str, overwrite: bool = False) -> str:
    """Create out_dir; refuse a non-empty one unless overwrite (then its weight files are removed)."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: output directory exists and is not empty (pass --overwrite)")
        for f in os.listdir(out_dir):
            if f.endswith((".safetensors", ".gguf")) or f == "model.safetensors.index.json":
                os.remove(os.path.join(out_dir, f))
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


class ShardedWriter:
    """Collects tensors and saves them in shards of at most max_shard_bytes (one file when it all fits)."""

    def __init__(self, out_dir: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor):
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        n = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + n > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().clone()
        self._pending_bytes += n
        self.total_bytes += n

    def _flush(self):
        tmp = f".shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, os.path.join(self.out_dir, tmp), metadata={"format": "pt"})
        self._shards.append((tmp, sorted(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish writing; returns the shard file names."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (tmp, tensors), final in zip(self._shards, names):
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            weight_map.update({t: final for t in tensors})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(os.path.join(self.out_dir, "model.safetensors.index.json"), index)
        return names


def write_json(path: str, obj: dict):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_tokenizer(src_dir: str, out_dir: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def experts_config_key(config: dict) -> str:
    """The config.json key holding the routed expert count (num_experts or Mixtral's num_local_experts)."""
    for key in ("num_experts", "num_local_experts"):
        if key in config:
            return key
    raise ValueError("config.json has neither num_experts nor num_local_experts")
