"""`moepage split SRC OUT`: resident.safetensors + one safetensors file per routed expert + moepage.json.

Tensors keep their checkpoint names and dtypes, so the family tables read both layouts.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable

import torch
from safetensors.torch import save_file

from moepage.engine.checkpoint import (
    MANIFEST, TOKENIZER_FILES, manifest_size, model_args_of, open_checkpoint, split_shard_path,
)
from moepage.paging.bf16_12bit import ENCODING, pack
from moepage.paging.fp8_experts import Fp8ExpertSource
from moepage.paging.fp8_experts import split_tensors as fp8_split_tensors
from moepage.paging.model_paths import read_model_json, resolve_model_file
from moepage.paging.safetensors_file import CheckpointError, shown
from moepage.paging.sources import sha256_of

RESIDENT_FILE = "resident.safetensors"


def check_lossless(name: str, t: torch.Tensor):
    if t.dtype != torch.bfloat16:
        raise ValueError(f"--lossless encodes bf16 experts; {name} is {t.dtype} (split without --lossless)")


def encoded_shard(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One expert's bf16 tensors -> (the safetensors entries of their 12-bit encoding, the file's metadata)."""
    entries: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        check_lossless(name, t)
        entries.update(pack(t).tensors(name))
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    return entries, {"format": "pt", "encoding": ENCODING, "shapes": json.dumps(shapes)}


def split_checkpoint(src: str, out: str, log: Callable[[str], None] = lambda s: None, lossless: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """lossless: store each bf16 expert in the 12-bit encoding (paging/bf16_12bit.py): a quarter fewer bytes to
    page in, the same bits after decoding. progress(done, total) is called after each expert shard."""
    ckpt = open_checkpoint(src, drop_page_cache=False, verify=True)
    fused = ckpt.family.expert_source is not None  # one tensor per layer: each shard holds its expert's slices
    if fused and lossless:  # refused before anything is written
        raise ValueError(f"{src}: --lossless encodes bf16 per-expert tensors; {ckpt.family.name} keeps its experts "
                         f"fused per layer (with biases; MXFP4 as published): split without --lossless")
    fp8 = isinstance(ckpt.experts, Fp8ExpertSource)
    if fp8 and lossless:  # refused before anything is written
        raise ValueError(f"{src}: --lossless encodes bf16 experts; an FP8 checkpoint's experts are split as stored")
    if os.path.exists(os.path.join(out, MANIFEST)):
        raise FileExistsError(f"{out}: already holds a split model ({MANIFEST}); choose an empty directory")
    if lossless and ckpt.args.moe_layers:  # refused before anything is written
        first = ckpt.experts.read(ckpt.args.moe_layers[0], 0)
        for p, t in ckpt.expert_names.items():
            check_lossless(t.format(L=ckpt.args.moe_layers[0], E=0), getattr(first, p))
    os.makedirs(out, exist_ok=True)
    files: dict[str, dict] = {}

    def record(rel: str):
        path = os.path.join(out, rel)
        files[rel] = {"size": os.path.getsize(path), "sha256": sha256_of(path)}

    resident = {name: ckpt.read_tensor(name).contiguous() for name in ckpt.resident_checkpoint_names().values()}
    if fp8:  # FP8 resident weights come dequantized (float32): stored in the checkpoint's dtype, as they are served
        dtype = getattr(torch, ckpt.args.torch_dtype, torch.float32)
        resident = {n: t.to(dtype) if ckpt.index.info(n, "resident weight").dtype == torch.float8_e4m3fn else t
                    for n, t in resident.items()}
    save_file(resident, os.path.join(out, RESIDENT_FILE), metadata={"format": "pt"})
    record(RESIDENT_FILE)
    log(f"resident weights: {len(resident)} tensors")
    del resident
    args = ckpt.args
    done, total = 0, len(args.moe_layers) * args.num_experts
    for layer in args.moe_layers:
        for e in range(args.num_experts):
            rel = split_shard_path(layer, e)
            os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
            if fused:
                tensors = {n: t.contiguous() for n, t in ckpt.experts.slices(layer, e).items()}
            else:
                w = ckpt.experts.read(layer, e)
                names = {p: t.format(L=layer, E=e) for p, t in ckpt.expert_names.items()}
                tensors = fp8_split_tensors(w, names) if fp8 else {names[p]: getattr(w, p).contiguous() for p in names}
            if lossless:
                entries, metadata = encoded_shard(tensors)
                save_file(entries, os.path.join(out, rel), metadata=metadata)
            else:
                save_file(tensors, os.path.join(out, rel))
            record(rel)
            done += 1
            if progress:
                progress(done, total)
    copied = []
    for name in ("config.json",) + TOKENIZER_FILES:
        p = resolve_model_file(ckpt.root, name, "model file", must_exist=False)  # never a link out of the model
        if p is not None:
            shutil.copyfile(p, os.path.join(out, name))
            copied.append(name)
    manifest = {
        "format": "moepage-split",
        "version": 1,
        "source_format": ckpt.kind,
        "architecture": ckpt.config.get("model_type"),
        "config": ckpt.config,
        "resident": RESIDENT_FILE,
        "experts": {"layers": args.moe_layers, "per_layer": args.num_experts, "shard_pattern": split_shard_path(0, 0)
                    .replace("L000", "L{layer:03d}").replace("E0000", "E{expert:04d}")},
        "tokenizer_files": [c for c in copied if c != "config.json"],
        **({"expert_encoding": ENCODING} if lossless else {}),
        "files": files,
    }
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def verify_split(root: str, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Problems found in a split directory (empty list: every file present with its recorded size and sha256);
    progress(done, total) is called as the files are checked."""
    path = os.path.join(root, MANIFEST)
    try:
        manifest = read_model_json(root, MANIFEST, "split manifest", must_exist=False)
    except CheckpointError as e:
        return [str(e)]
    if manifest is None:
        return [f"{path}: missing (not a moepage split directory)"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return [f"{path}: not a moepage split manifest (no files map)"]
    problems = _manifest_problems(root, manifest)
    files = sorted(manifest["files"].items())
    for done, (rel, meta) in enumerate(files):
        if progress:
            progress(done, len(files))
        problems += _file_problems(root, rel, meta)
    if progress:
        progress(len(files), len(files))
    return problems


def _manifest_problems(root: str, manifest: dict) -> list[str]:
    """The manifest's config and resident entry: a config the loader accepts, a resident file listed under files."""
    path = os.path.join(root, MANIFEST)
    problems = []
    if "config" in manifest or manifest.get("source_format") != "gguf":
        try:
            model_args_of(manifest.get("config"), f"{path} (config)")
        except CheckpointError as e:
            problems.append(str(e))
    resident = manifest.get("resident")
    if not isinstance(resident, str) or resident not in manifest["files"]:
        problems.append(f"{path}: resident must name a file listed under files")
    return problems


def _file_problems(root: str, rel, meta) -> list[str]:
    """One manifest entry against the file: inside root, a regular file, the recorded size, then the sha256."""
    where = f"{os.path.join(root, MANIFEST)}: files[{shown(rel)}]"
    if not isinstance(meta, dict):
        return [f"{where} is not an object with size and sha256"]
    size, digest = manifest_size(meta), meta.get("sha256")
    if size is None:
        return [f"{where}.size is missing or not a byte count"]
    if not isinstance(digest, str):
        return [f"{where}.sha256 is missing"]
    try:
        p = resolve_model_file(root, rel, f"file listed in {MANIFEST}", must_exist=False)
    except CheckpointError as e:
        return [str(e)]
    if p is None:
        return [f"{os.path.join(root, rel)}: missing"]
    if os.path.getsize(p) != size:
        return [f"{p}: size {os.path.getsize(p)} bytes, manifest says {size}"]
    try:
        if sha256_of(p) != digest:
            return [f"{p}: sha256 mismatch (file is corrupt)"]
    except (CheckpointError, OSError) as e:
        return [str(e) if isinstance(e, CheckpointError) else f"{p}: cannot read: {e.strerror}"]
    return []
