"""`moepage serve owner/repo --lazy`: a local directory for one commit of a Hub repo in which only the resident
weights, the config and the tokenizer are downloaded now; the routed experts come on their first miss
(paging/hub_source.py) and stay in its disk tier (paging/disk_tier.py).

The directory is a `moepage split` directory (moepage.json, resident.safetensors, config and tokenizer files,
experts/ filled as they are fetched) plus hub.json, written last: a directory without it is unfinished and is
built again. It lives under the Hugging Face cache, `HF_HUB_CACHE/moepage-lazy/models--OWNER--NAME/COMMIT/`, with
`refs/REVISION` naming the commit (as the HF cache does), so a later start finds it without the network.

- A `moepage split` upload (moepage.json in the repo): its files but the experts are downloaded and checked
  against the manifest's sha256; an expert is one file, fetched whole on its miss.
- An original safetensors checkpoint: each weight file's header is read by range; the resident tensors are read
  by range and written into resident.safetensors; each expert's tensors (name, dtype, shape, offsets) go into
  hub.json, to be read by range on its miss.
- One GGUF file of a repo (owner/repo:QUANT): engine/hub_gguf.py, in the directory COMMIT.FILE.
Every URL names the commit, so the bytes cannot change between requests; resident files are written atomically
and their sha256 recorded in moepage.json (`moepage verify DIR` checks them).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile

import torch

from moepage.engine.checkpoint import INDEX, MANIFEST, TOKENIZER_FILES, model_args_of, read_manifest, split_shard_path
from moepage.engine.weight_names import resident_names, to_checkpoint
from moepage.paging.disk_tier import EXPERTS_DIR, TMP_SUFFIX, fsync_dir, write_atomic
from moepage.paging.hub_plan import LAZY_FILE, LAZY_FORMAT, RemoteTensor
from moepage.paging.hub_source import MAX_REQUEST, HubRepo
from moepage.paging.model_paths import MAX_JSON_BYTES, read_model_json
from moepage.paging.safetensors_file import DTYPE_NAMES, MAX_HEADER, CheckpointError, SafetensorsFile

RESIDENT = "resident.safetensors"
SMALL_FILES = ("config.json",) + TOKENIZER_FILES
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def lazy_root(repo_id: str) -> str:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(constants.HF_HUB_CACHE, "moepage-lazy", repo_folder_name(repo_id=repo_id, repo_type="model"))


def _ref_name(revision: str | None) -> str | None:
    """The refs/ file name of a revision (None: one that cannot be a plain file name, like a/b or ..)."""
    rev = revision or "main"
    return rev if re.match(r"^[\w.-]{1,200}$", rev) and rev not in (".", "..") else None


def lazy_dir(repo_id: str, commit: str, gguf_file: str | None = None) -> str:
    """COMMIT/ for a safetensors or split repo; COMMIT.FILE/ for one GGUF file of it."""
    name = commit if gguf_file is None else f"{commit}.{gguf_file.replace('/', '--')}"
    return os.path.join(lazy_root(repo_id), name)


def cached_lazy_dirs(repo_id: str, revision: str | None = None) -> list[tuple[str, str | None]]:
    """[(finished lazy directory, its GGUF file or None)] an earlier start made of repo_id at revision (no network)."""
    root = lazy_root(repo_id)
    rev = revision or "main"
    commit = rev if _COMMIT.match(rev) else None
    ref = _ref_name(revision)
    if commit is None and ref is not None and os.path.isfile(os.path.join(root, "refs", ref)):
        with open(os.path.join(root, "refs", ref)) as f:
            commit = f.read(100).strip()
    if commit is None or not _COMMIT.match(commit) or not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if (name == commit or name.startswith(commit + ".")) and os.path.isfile(os.path.join(d, LAZY_FILE)):
            lazy = read_model_json(d, LAZY_FILE, "lazy Hub model description")
            out.append((d, lazy.get("file") if isinstance(lazy, dict) else None))
    return out


def prepare_lazy(repo_id: str, files: list[str], revision: str | None = None, gguf_file: str | None = None,
                 log=lambda s: None) -> str:
    """The lazy directory of repo_id at revision (built now if this commit has none); files: the repo's listing;
    gguf_file: serve that GGUF file of the repo."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    first = gguf_file or (MANIFEST if MANIFEST in files else "config.json")
    if first not in files:
        raise CheckpointError(f"{repo_id}: --lazy serves a safetensors checkpoint, a `moepage split` upload or a GGUF "
                              f"file; the repository has no {first}")
    meta = get_hf_file_metadata(hf_hub_url(repo_id, first, revision=revision, endpoint=constants.ENDPOINT))
    commit = meta.commit_hash or ""
    if not _COMMIT.match(commit):
        raise CheckpointError(f"{repo_id}: the Hub did not name the commit of revision {revision or 'main'!r}")
    out = lazy_dir(repo_id, commit, gguf_file)
    if not os.path.isfile(os.path.join(out, LAZY_FILE)):
        repo = HubRepo(repo_id, commit)
        os.makedirs(out, exist_ok=True)
        if gguf_file is not None:
            from moepage.engine.hub_gguf import from_gguf

            lazy = from_gguf(repo, out, gguf_file, log)
        elif first == MANIFEST:
            lazy = _from_split(repo, out, files, log)
        else:
            lazy = _from_checkpoint(repo, out, files, log)
        lazy.update({"format": LAZY_FORMAT, "version": 1, "repo_id": repo_id, "revision": revision, "commit": commit})
        write_atomic(os.path.join(out, LAZY_FILE), json.dumps(lazy).encode())
    ref = _ref_name(revision)
    if ref is not None:
        write_atomic(os.path.join(lazy_root(repo_id), "refs", ref), commit.encode())
    return out


def _download(repo: HubRepo, rel: str, out: str, size: int, sha256: str | None = None) -> str:
    """rel (size bytes) into out/rel, atomically; checked against sha256 when given; returns its sha256."""
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        digest = repo.read_file(rel, size, sink=f.write)
        f.flush()
        os.fsync(f.fileno())
    if sha256 is not None and digest != sha256:
        os.unlink(tmp)
        raise CheckpointError(f"{repo.repo_id}/{rel}: the Hub's copy does not match the manifest's sha256")
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    return digest


def _small_files(repo: HubRepo, out: str, names: list[str]) -> dict[str, dict]:
    """config and tokenizer files (each at most MAX_JSON_BYTES) into out: {name: {size, sha256}}."""
    from huggingface_hub import get_hf_file_metadata

    got = {}
    for name in names:
        size = get_hf_file_metadata(repo.url(name)).size
        if size is None or size > MAX_JSON_BYTES:
            raise CheckpointError(f"{repo.repo_id}/{name}: size unknown or larger than {MAX_JSON_BYTES >> 20} MiB")
        got[name] = {"size": size, "sha256": _download(repo, name, out, size)}
    return got


def _from_split(repo: HubRepo, out: str, files: list[str], log) -> dict:
    """A `moepage split` upload: the manifest, then every file it lists but the experts (checked against it), and
    the config and tokenizer files it copied (the manifest names them, without hashes)."""
    _small_files(repo, out, [MANIFEST])
    manifest = read_manifest(out)
    _small_files(repo, out, [n for n in SMALL_FILES if n in files and n not in manifest["files"]])
    for rel, meta in sorted(manifest["files"].items()):
        if rel.replace("\\", "/").startswith(EXPERTS_DIR + "/"):
            continue
        if rel.startswith("/") or ".." in rel.replace("\\", "/").split("/"):
            raise CheckpointError(f"{out}/{MANIFEST}: file {rel!r} lies outside the model directory")
        log(f"downloading {rel} ({meta.get('size', meta.get('bytes'))} bytes)")
        _download(repo, rel, out, meta.get("size", meta.get("bytes")), meta["sha256"])
    return {"kind": "split"}


def _from_checkpoint(repo: HubRepo, out: str, files: list[str], log) -> dict:
    from huggingface_hub import get_hf_file_metadata

    metas = {}

    def meta(name: str):
        if name not in metas:
            m = get_hf_file_metadata(repo.url(name))
            if m.size is None or not m.etag:
                raise CheckpointError(f"{repo.repo_id}/{name}: the Hub gave no size or ETag")
            metas[name] = m
        return metas[name]

    small = _small_files(repo, out, [n for n in SMALL_FILES + (INDEX,) if n in files])
    config = read_model_json(out, "config.json", "config.json")
    family, args = model_args_of(config, f"{repo.repo_id}/config.json")
    names, expert_names = family.checkpoint_names(config)
    if any("{E}" not in t for t in expert_names.values()):
        raise CheckpointError(f"{repo.repo_id}: this family stores its experts fused; --lazy reads per-expert "
                              f"tensors (run `moepage split` on it and publish that)")
    weights = _weight_files(out, files, repo.repo_id)
    where: dict[str, RemoteTensor] = {}
    for name in weights:
        for t in _remote_header(repo, name, meta(name).size):
            where[t.name] = t
    resident = {c: to_checkpoint(names, c) for c in resident_names(args)}
    missing = [n for n in resident.values() if n not in where]
    if missing:
        raise CheckpointError(f"{repo.repo_id}: tensor {missing[0]!r} (resident weight) is in no weight file")
    log(f"downloading {len(resident)} resident tensors by range from {len(weights)} weight files")
    resident_sha, resident_size = _write_resident(repo, out, [where[n] for n in resident.values()])
    experts = {}
    for layer in args.moe_layers:
        for e in range(args.num_experts):
            parts = []
            for p, template in expert_names.items():
                n = template.format(L=layer, E=e)
                if n not in where:
                    raise CheckpointError(f"{repo.repo_id}: tensor {n!r} (layer {layer} expert {e} {p}) is in no "
                                          f"weight file")
                t = where[n]
                parts.append([t.file, t.name, t.dtype, list(t.shape), t.start, t.end])
            experts[split_shard_path(layer, e)] = parts
    manifest = {
        "format": "moepage-split", "version": 1, "source_format": "hf", "architecture": config.get("model_type"),
        "config": config, "resident": RESIDENT,
        "experts": {"layers": args.moe_layers, "per_layer": args.num_experts,
                    "shard_pattern": "experts/L{layer:03d}/E{expert:04d}.safetensors"},
        "tokenizer_files": [n for n in small if n in TOKENIZER_FILES],
        "files": {RESIDENT: {"size": resident_size, "sha256": resident_sha}, **small},
    }
    write_atomic(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    return {"kind": "ranges", "files": {n: {"etag": meta(n).etag, "size": meta(n).size} for n in weights},
            "experts": experts}


def _weight_files(out: str, files: list[str], repo_id: str) -> list[str]:
    index = read_model_json(out, INDEX, INDEX, must_exist=False)
    if index is None:
        found = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
        if not found:
            raise CheckpointError(f"{repo_id}: no *.safetensors weight files")
        return found
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{repo_id}/{INDEX}: weight_map must map tensor names to file names")
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if n not in files]
    if bad:
        raise CheckpointError(f"{repo_id}/{INDEX}: names {bad[0]!r}, which the repository does not have")
    return names


def _remote_header(repo: HubRepo, name: str, size: int) -> list[RemoteTensor]:
    """The tensors of a Hub safetensors file from its header, read by two range requests and checked by the
    local reader (SafetensorsFile) on a sparse file of the same size holding only the header."""
    if size < 8:
        raise CheckpointError(f"{repo.repo_id}/{name}: not a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", repo.read_range(name, 0, 8))
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{repo.repo_id}/{name}: not a safetensors file: declared header length exceeds the "
                              f"file ({size} bytes)")
    header = repo.read_range(name, 8, 8 + n)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, os.path.basename(name))
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", n) + header)
            f.truncate(size)  # sparse: no data blocks, only the length the offsets are checked against
        try:
            sf = SafetensorsFile(path)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(path, f"{repo.repo_id}/{name}")) from None
        try:
            return [RemoteTensor(name, i.name, DTYPE_NAMES[i.dtype], tuple(i.shape), i.start, i.end)
                    for i in sf.tensors.values()]
        finally:
            sf.close()


def _itemsize(t: RemoteTensor) -> int:
    from moepage.paging.safetensors_file import DTYPES

    return torch.empty(0, dtype=DTYPES[t.dtype]).element_size()


def _write_resident(repo: HubRepo, out: str, tensors: list[RemoteTensor]) -> tuple[str, int]:
    """resident.safetensors from the Hub: the tensors ordered widest dtype first (no padding needed), then as they
    lie in the Hub files, so neighbours there are one request; streamed to disk, at most MAX_REQUEST at a time."""
    order = sorted(tensors, key=lambda t: (-_itemsize(t), t.file, t.start))
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for t in order:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [at, at + t.end - t.start]}
        at += t.end - t.start
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    runs: list[list[int | str]] = []  # [file, start, end]
    for t in order:
        if runs and runs[-1][0] == t.file and runs[-1][2] == t.start and t.end - runs[-1][1] <= MAX_REQUEST:
            runs[-1][2] = t.end
        else:
            runs.append([t.file, t.start, t.end])
    path = os.path.join(out, RESIDENT)
    tmp = os.path.join(out, f".{RESIDENT}.{os.getpid()}{TMP_SUFFIX}")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for block in (struct.pack("<Q", len(raw)), raw):
            f.write(block)
            h.update(block)
        for file, start, end in runs:
            for a in range(start, end, MAX_REQUEST):
                data = repo.read_range(file, a, min(end, a + MAX_REQUEST))
                f.write(data)
                h.update(data)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    if size != 8 + len(raw) + at:
        os.unlink(tmp)
        raise CheckpointError(f"{repo.repo_id}: resident weights came to {size} bytes, expected {8 + len(raw) + at}")
    os.replace(tmp, path)
    fsync_dir(out)
    return h.hexdigest(), size
