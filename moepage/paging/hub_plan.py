"""hub.json: how a lazy directory's expert shards are made from a Hub repo (read by paging/hub_source.py, written
by engine/hub_lazy.py). It is a file like any other: every field is checked before it is used.

{"format": "moepage-hub-lazy", "version": 1, "repo_id", "revision", "commit", "kind": "split" | "ranges",
 "file": the Hub file a GGUF model came from (GGUF only),
 ranges only: "files": {Hub file: {"etag", "size"}},
              "experts": {shard path: [[Hub file, tensor name, safetensors dtype, shape, start, end], ...]},
              "shard_metadata": {shard path: {key: value}} (GGUF: each part's GGML type and shape)}
"split": each shard is the repo's file of the same path (sizes and sha256 from the split manifest).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moepage.paging.model_paths import read_model_json
from moepage.paging.pread import CheckpointError
from moepage.paging.safetensors_file import DTYPES

LAZY_FILE = "hub.json"  # the marker of a lazy directory, written last
LAZY_FORMAT = "moepage-hub-lazy"


@dataclass(frozen=True)
class RemoteTensor:
    """One tensor of one expert as it lies in a Hub file."""

    file: str
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class HubPlan:
    repo_id: str
    commit: str
    kind: str  # "split" | "ranges"
    sizes: dict[str, int] = field(default_factory=dict)  # split: shard path -> bytes (the manifest's)
    plans: dict[str, list[RemoteTensor]] = field(default_factory=dict)  # ranges: shard path -> its tensors
    file_etags: dict[str, str] = field(default_factory=dict)  # ranges: Hub file -> ETag
    shard_metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # ranges: shard path -> metadata

    def etag_of(self, rel: str) -> str:
        """The ETag(s) of the Hub file(s) a ranges shard's bytes come from (what its recorded sha256 is against)."""
        return "+".join(sorted({self.file_etags[t.file] for t in self.plans[rel]}))


def check_remote_tensor(t: RemoteTensor, file_size: int, where: str):
    """Offsets inside the file, the span the shape and dtype need."""
    if t.dtype not in DTYPES:
        raise CheckpointError(f"{where}: tensor {t.name!r} has an unsupported dtype")
    n = math.prod(t.shape) * torch.empty(0, dtype=DTYPES[t.dtype]).element_size()
    if not (0 <= t.start <= t.end <= file_size) or t.end - t.start != n or any(d < 0 for d in t.shape):
        raise CheckpointError(f"{where}: tensor {t.name!r}: bytes [{t.start}, {t.end}) do not fit the file "
                              f"({file_size} bytes) or its shape {list(t.shape)}")


def coalesced(parts: list[RemoteTensor]) -> list[tuple[str, int, int, list[RemoteTensor]]]:
    """[(file, start, end, tensors)]: tensors lying back to back in one file share one request."""
    out: list[tuple[str, int, int, list[RemoteTensor]]] = []
    for t in sorted(parts, key=lambda t: (t.file, t.start)):
        if out and out[-1][0] == t.file and out[-1][2] == t.start:
            f, s, _, ts = out[-1]
            out[-1] = (f, s, t.end, ts + [t])
        else:
            out.append((t.file, t.start, t.end, [t]))
    return out


def _error(root: str, what: str) -> CheckpointError:
    return CheckpointError(f"{root}/{LAZY_FILE}: {what}")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def load_hub_plan(root: str, manifest: dict) -> HubPlan:
    """root's hub.json with its split manifest, checked."""
    lazy = read_model_json(root, LAZY_FILE, "lazy Hub model description")
    if not isinstance(lazy, dict) or lazy.get("format") != LAZY_FORMAT or lazy.get("version") != 1:
        raise _error(root, f"not a {LAZY_FORMAT} version 1 description")
    repo_id, commit, kind = lazy.get("repo_id"), lazy.get("commit"), lazy.get("kind")
    if not (isinstance(repo_id, str) and isinstance(commit, str) and commit):
        raise _error(root, "repo_id and commit must be strings")
    if kind == "split":
        sizes = {}
        for rel, meta in manifest["files"].items():
            size = meta.get("size", meta.get("bytes"))
            if not _is_count(size):
                raise _error(root, f"the manifest's size of {rel!r} is not a byte count")
            sizes[rel] = size
        return HubPlan(repo_id, commit, kind, sizes=sizes)
    files, experts, metadata = lazy.get("files"), lazy.get("experts"), lazy.get("shard_metadata", {})
    if kind != "ranges" or not all(isinstance(v, dict) for v in (files, experts, metadata)):
        raise _error(root, "kind must be 'split', or 'ranges' with files, experts (and shard_metadata) maps")
    plan = HubPlan(repo_id, commit, kind)
    for name, meta in files.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("etag"), str) and _is_count(meta.get("size"))):
            raise _error(root, f"files[{name!r}] must have an etag and a size")
        plan.file_etags[name] = meta["etag"]
    for rel, entries in experts.items():
        if not isinstance(entries, list) or not entries:
            raise _error(root, f"experts[{rel!r}] must list the expert's tensors")
        tensors = []
        for e in entries:
            try:
                file, name, dtype, shape, start, end = e
                t = RemoteTensor(file, name, dtype, tuple(shape), start, end)
                ok = (file in files and isinstance(name, str) and isinstance(dtype, str) and len(shape) <= 8
                      and all(_is_count(d) for d in shape) and _is_count(start) and _is_count(end))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise _error(root, f"experts[{rel!r}]: an entry is not [file, name, dtype, shape, start, end]")
            check_remote_tensor(t, files[file]["size"], f"{root}/{LAZY_FILE}: experts[{rel!r}]")
            tensors.append(t)
        plan.plans[rel] = tensors
    for rel, meta in metadata.items():
        if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
            raise _error(root, f"shard_metadata[{rel!r}] must map strings to strings")
        plan.shard_metadata[rel] = meta
    return plan
