"""Open a model path: an original Hugging Face safetensors directory or a `moepage split` directory.

Either way the result is the family, its ModelArgs, a reader for resident tensors and an ExpertSource.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch

from moepage.engine.families import family_for
from moepage.engine.model_args import ModelArgs
from moepage.engine.weight_names import resident_names, to_checkpoint
from moepage.paging.safetensors_file import CheckpointError, SafetensorsFile
from moepage.paging.sources import (
    ExpertSource, SafetensorsExpertSource, SplitExpertSource, TensorIndex, TensorRows,
)

MANIFEST = "moepage.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
)


def split_shard_path(layer: int, expert: int) -> str:
    return f"experts/L{layer:03d}/E{expert:04d}.safetensors"


@dataclass
class Checkpoint:
    kind: str  # "hf" | "split"
    root: str
    config: dict
    family: ModuleType
    args: ModelArgs
    experts: ExpertSource
    read_tensor: Callable[[str], torch.Tensor]  # checkpoint name -> tensor
    tensor_nbytes: Callable[[str], int]
    generation_config: dict = field(default_factory=dict)
    tensor_numel: Callable[[str], int] | None = None
    index: TensorIndex | None = None  # safetensors checkpoints: where each resident tensor lives

    def tensor_rows(self, name: str, dtype: torch.dtype, device) -> TensorRows | None:
        """The resident tensor `name` read row by row from disk, where the format allows it."""
        if self.index is None:
            return None
        return TensorRows(self.index.file_of(name, "resident weight"), name, dtype, device)

    def resident_checkpoint_names(self) -> dict[str, str]:
        """canonical -> checkpoint name for every resident tensor."""
        return {n: to_checkpoint(self.family.NAMES, n) for n in resident_names(self.args)}

    @property
    def tokenizer_dir(self) -> str:
        return self.root

    def resident_tensor(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        """A resident weight as the model holds it (GGUF checkpoints keep quantized weights quantized)."""
        return self.read_tensor(name).to(device=device, dtype=dtype)

    def load_tokenizer(self):
        """The model's Tokenizer (FileNotFoundError when it has none); GGUF checkpoints build it from metadata."""
        from moepage.engine.tokenizer import Tokenizer

        return Tokenizer.from_dir(self.tokenizer_dir)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def _generation_config(root: str) -> dict:
    p = os.path.join(root, "generation_config.json")
    return _load_json(p) if os.path.exists(p) else {}


def open_checkpoint(path: str, drop_page_cache: bool = True, verify: bool = True) -> Checkpoint:
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isfile(path) and _is_gguf(path):
        from moepage.engine.gguf_checkpoint import open_gguf

        return open_gguf(path, drop_page_cache, verify)
    if os.path.isfile(path):
        raise CheckpointError(f"{path}: a single file is not a safetensors model directory (GGUF files are opened by the GGUF loader)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model directory")
    if os.path.exists(os.path.join(path, MANIFEST)):
        return _open_split(path, drop_page_cache, verify)
    return _open_hf(path, drop_page_cache)


def _is_gguf(path: str) -> bool:
    if path.endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _open_hf(root: str, drop_page_cache: bool) -> Checkpoint:
    config = _load_json(os.path.join(root, "config.json"))
    family = family_for(config.get("model_type", "?"))
    args = family.model_args(config)
    files = sorted(glob.glob(os.path.join(root, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors weight files")
    index_path = os.path.join(root, "model.safetensors.index.json")
    if os.path.exists(index_path):
        wanted = set(_load_json(index_path).get("weight_map", {}).values())
        missing = [w for w in wanted if not os.path.exists(os.path.join(root, w))]
        if missing:
            raise CheckpointError(f"{os.path.join(root, missing[0])}: shard named in model.safetensors.index.json is missing")
        files = [os.path.join(root, w) for w in sorted(wanted)]
    index = TensorIndex([SafetensorsFile(f, drop_page_cache=drop_page_cache) for f in files])
    return Checkpoint(
        kind="hf", root=root, config=config, family=family, args=args,
        experts=SafetensorsExpertSource(index, family.EXPERT_NAMES),
        read_tensor=lambda n: index.read(n, "resident weight"),
        tensor_nbytes=lambda n: index.info(n, "resident weight").nbytes,
        generation_config=_generation_config(root),
        tensor_numel=lambda n: _numel(index.info(n, "resident weight").shape),
        index=index,
    )


def _open_split(root: str, drop_page_cache: bool, verify: bool) -> Checkpoint:
    manifest = _load_json(os.path.join(root, MANIFEST))
    if manifest.get("format") != "moepage-split":
        raise CheckpointError(f"{os.path.join(root, MANIFEST)}: not a moepage split manifest")
    if manifest.get("source_format") == "gguf":
        from moepage.engine.gguf_checkpoint import open_gguf_split

        return open_gguf_split(root, manifest, drop_page_cache, verify)
    config = manifest["config"]
    family = family_for(config.get("model_type", "?"))
    args = family.model_args(config)
    hashes = {rel: meta["sha256"] for rel, meta in manifest["files"].items()}
    resident = SafetensorsFile(os.path.join(root, manifest["resident"]), drop_page_cache=False)
    index = TensorIndex([resident])
    source = SplitExpertSource(root, split_shard_path, family.EXPERT_NAMES, hashes, drop_page_cache, verify,
                               encoding=manifest.get("expert_encoding"))
    return Checkpoint(
        kind="split", root=root, config=config, family=family, args=args, experts=source,
        read_tensor=lambda n: index.read(n, "resident weight"),
        tensor_nbytes=lambda n: index.info(n, "resident weight").nbytes,
        generation_config=_generation_config(root),
        tensor_numel=lambda n: _numel(index.info(n, "resident weight").shape),
        index=index,
    )
