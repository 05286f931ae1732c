"""Open a model path: an original Hugging Face safetensors directory or a `moepage split` directory.

Either way the result is the family, its ModelArgs, a reader for resident tensors and an ExpertSource.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from moepage.engine.families import FamilySpec, family_for
from moepage.engine.model_args import ConfigError, ModelArgs, eos_list, expert_shapes, resident_shape
from moepage.engine.weight_names import resident_names, to_checkpoint
from moepage.paging.fp8_experts import Fp8ExpertSource, Fp8SplitExpertSource, fp8_quantization, read_resident
from moepage.paging.model_paths import read_model_json, resolve_model_file
from moepage.paging.safetensors_file import CheckpointError, SafetensorsFile, shown
from moepage.paging.sources import (
    ExpertSource, SafetensorsExpertSource, ShardFiles, SplitExpertSource, TensorIndex,
)
from moepage.paging.tensor_rows import TensorRows

MANIFEST = "moepage.json"
INDEX = "model.safetensors.index.json"
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
    family: FamilySpec
    args: ModelArgs
    experts: ExpertSource
    read_tensor: Callable[[str], torch.Tensor]  # checkpoint name -> tensor
    tensor_nbytes: Callable[[str], int]
    generation_config: dict = field(default_factory=dict)
    tensor_numel: Callable[[str], int] | None = None
    index: TensorIndex | None = None  # safetensors checkpoints: where each resident tensor lives
    tensor_shape: Callable[[str], tuple] | None = None  # checkpoint name -> shape (torch order), from the header
    names: dict[str, str] = field(default_factory=dict)  # the family's resident name table in this layout
    expert_names: dict[str, str] = field(default_factory=dict)  # gate | up | down -> name of expert {E}, layer {L}

    def tensor_rows(self, name: str, dtype: torch.dtype, device) -> TensorRows | None:
        """The resident tensor `name` read row by row from disk, where the format allows it."""
        if self.index is None:
            return None
        f = self.index.file_of(name, "resident weight")
        info = f.tensors[name]
        if len(info.shape) != 2:
            return None
        return TensorRows.plain(f, name, info.start, tuple(info.shape), info.dtype, dtype, device)

    def resident_checkpoint_names(self) -> dict[str, str]:
        """canonical -> checkpoint name for every resident tensor."""
        return {n: to_checkpoint(self.names, n) for n in resident_names(self.args)}

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


def model_args_of(config, where: str) -> tuple[FamilySpec, ModelArgs]:
    """(family, ModelArgs) of a config; a ConfigError naming `where` (the file it came from) and the field."""
    try:
        if not isinstance(config, dict):
            raise ConfigError(f"the config must be a JSON object, not {type(config).__name__}")
        family = family_for(config.get("model_type"))
        return family, family.args(config)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _squeezed(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


def check_shapes(ckpt: Checkpoint):
    """Every resident tensor's shape against what the config implies, and the experts' (now where the source can
    tell from headers, else at each page-in): a model that loads is one the forward pass can run."""
    args = ckpt.args
    for canonical, name in ckpt.resident_checkpoint_names().items():
        want = resident_shape(args, canonical)
        got = tuple(ckpt.tensor_shape(name))
        # GGUF drops size-1 dimensions: a [1, H] row as [H], a conv [C, 1, W] as [C, W]
        if got != want and not (len(got) < len(want) and _squeezed(got) == _squeezed(want)):
            raise CheckpointError(f"{ckpt.root}: tensor {name!r} has shape {list(got)}, the config implies "
                                  f"{list(want)}")
    ckpt.experts.expect(expert_shapes(args), args.moe_layers, args.num_experts)


def _generation_config(root: str) -> dict:
    value = read_model_json(root, "generation_config.json", "generation config", must_exist=False)
    where = os.path.join(root, "generation_config.json")
    if value is not None and not isinstance(value, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    try:
        eos_list((value or {}).get("eos_token_id"))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return value or {}


def open_checkpoint(path: str, drop_page_cache: bool = True, verify: bool = True) -> Checkpoint:
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isfile(path) and _is_gguf(path):
        from moepage.engine.gguf_checkpoint import open_gguf

        return open_gguf(path, drop_page_cache, verify)
    if os.path.isfile(path):
        raise CheckpointError(f"{path}: a single file is not a safetensors model directory (GGUF files are opened by the GGUF loader)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such model directory")
    if os.path.lexists(os.path.join(path, MANIFEST)):
        return _open_split(path, drop_page_cache, verify)
    return _open_hf(path, drop_page_cache)


def _is_gguf(path: str) -> bool:
    if path.endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _weight_files(root: str) -> list[str]:
    """The safetensors files of an HF directory: those model.safetensors.index.json names, else every *.safetensors;
    each resolved inside the directory."""
    index = read_model_json(root, INDEX, INDEX, must_exist=False)
    if index is None:
        found = sorted(os.path.basename(f) for f in glob.glob(os.path.join(root, "*.safetensors")))
        if not found:
            raise CheckpointError(f"{root}: no *.safetensors weight files")
        return [resolve_model_file(root, name, "weight file") for name in found]
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{os.path.join(root, INDEX)}: weight_map must map tensor names to file names")
    return [resolve_model_file(root, w, f"shard named in {INDEX}") for w in sorted(set(weight_map.values()))]


def _open_hf(root: str, drop_page_cache: bool) -> Checkpoint:
    config = read_model_json(root, "config.json", "config.json")
    family, args = model_args_of(config, os.path.join(root, "config.json"))
    names, expert_names = family.checkpoint_names(config)
    index = TensorIndex([SafetensorsFile(f, drop_page_cache=drop_page_cache) for f in _weight_files(root)])
    fp8 = fp8_quantization(config, os.path.join(root, "config.json"))
    if fp8 is not None and family.expert_source is not None:
        raise CheckpointError(f"{root}: FP8 checkpoints of {family.name} (fused expert tensors) are not read")
    experts = (Fp8ExpertSource(index, expert_names, fp8) if fp8 is not None
               else (family.expert_source or SafetensorsExpertSource)(index, expert_names))
    ckpt = Checkpoint(
        kind="hf", root=root, config=config, family=family, args=args,
        experts=experts, names=names, expert_names=expert_names,
        read_tensor=(lambda n: read_resident(index, n, fp8)) if fp8 is not None
        else (lambda n: index.read(n, "resident weight")),
        tensor_nbytes=lambda n: index.info(n, "resident weight").nbytes,
        generation_config=_generation_config(root),
        tensor_numel=lambda n: _numel(index.info(n, "resident weight").shape),
        index=index,
        tensor_shape=lambda n: index.info(n, "resident weight").shape,
    )
    check_shapes(ckpt)
    return ckpt


def read_manifest(root: str) -> dict:
    """The split manifest of root, checked: a moepage-split object with a files map of {size|bytes, sha256}."""
    path = os.path.join(root, MANIFEST)
    manifest = read_model_json(root, MANIFEST, "split manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != "moepage-split":
        raise CheckpointError(f"{path}: not a moepage split manifest (format is not 'moepage-split')")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: files must map each file's path to its size and sha256")
    for rel, meta in files.items():
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: files[{shown(rel)}] must be an object with size and sha256")
        if not isinstance(meta.get("sha256"), str) or len(meta["sha256"]) != 64:
            raise CheckpointError(f"{path}: files[{shown(rel)}].sha256 must be a 64-character hex digest")
        size = manifest_size(meta)
        if size is None:
            raise CheckpointError(f"{path}: files[{shown(rel)}].size is missing or not a byte count")
    return manifest


def manifest_size(meta: dict) -> int | None:
    """A file entry's recorded size ("size"; GGUF splits write "bytes"), None when absent or not a count."""
    size = meta.get("size", meta.get("bytes"))
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def manifest_resident(root: str, manifest: dict, default: str | None = None) -> str:
    """The resident weights file the manifest names, resolved inside root."""
    name = manifest.get("resident", default)
    return resolve_model_file(root, name, f"resident weights named in {MANIFEST}")


def _open_split(root: str, drop_page_cache: bool, verify: bool) -> Checkpoint:
    manifest = read_manifest(root)
    if manifest.get("source_format") == "gguf":
        from moepage.engine.gguf_checkpoint import open_gguf_split

        return open_gguf_split(root, manifest, drop_page_cache, verify)
    where = os.path.join(root, MANIFEST)
    if "config" not in manifest:
        raise ConfigError(f"{where}: config is missing")
    config = manifest["config"]
    family, args = model_args_of(config, f"{where} (config)")
    names, expert_names = family.checkpoint_names(config)
    hashes = {rel: meta["sha256"] for rel, meta in manifest["files"].items()}
    resident = SafetensorsFile(manifest_resident(root, manifest), drop_page_cache=False)
    index = TensorIndex([resident])
    if os.path.lexists(os.path.join(root, "hub.json")):  # `serve --lazy`: experts come from the Hub on a miss
        from moepage.paging.hub_source import hub_expert_source

        source = hub_expert_source(root, manifest, split_shard_path, hashes, drop_page_cache, expert_names)
    elif family.expert_source is not None:  # fused per layer in the checkpoint: each shard holds [1, ...] slices
        shards = ShardFiles(root, split_shard_path, hashes, drop_page_cache, verify)
        source = family.expert_source(TensorIndex([]), expert_names).in_shards(shards, args.moe_layers)
    elif (fp8 := fp8_quantization(config, f"{where} (config)")) is not None:
        source = Fp8SplitExpertSource(root, split_shard_path, expert_names, hashes, fp8, drop_page_cache, verify)
    else:
        source = SplitExpertSource(root, split_shard_path, expert_names, hashes, drop_page_cache, verify,
                                   encoding=manifest.get("expert_encoding"))
    ckpt = Checkpoint(
        kind="split", root=root, config=config, family=family, args=args, experts=source,
        names=names, expert_names=expert_names, read_tensor=lambda n: index.read(n, "resident weight"),
        tensor_nbytes=lambda n: index.info(n, "resident weight").nbytes,
        generation_config=_generation_config(root),
        tensor_numel=lambda n: _numel(index.info(n, "resident weight").shape),
        index=index,
        tensor_shape=lambda n: index.info(n, "resident weight").shape,
    )
    check_shapes(ckpt)
    return ckpt
