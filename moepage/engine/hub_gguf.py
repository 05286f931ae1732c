"""`serve owner/repo:QUANT --lazy`: a lazy directory from one GGUF file on the Hub, laid out as a GGUF split
(surgery/split_gguf.py): resident.gguf (all metadata, every tensor but the routed experts) written now from range
reads; each expert's slices of `blk.N.ffn_{gate,up,down}_exps` named in hub.json, read by range on its miss (three
requests: the three tensors lie apart in the file) into a shard of the split's layout.

The header is parsed by the same bounded parser as a local file (paging/gguf_header.py), over range reads.
"""
from __future__ import annotations

import bisect
import os

from moepage.engine.checkpoint import model_args_of, split_shard_path
from moepage.engine.families import common
from moepage.engine.gguf_config import gguf_config
from moepage.paging.disk_tier import TMP_SUFFIX, fsync_dir
from moepage.paging.gguf_experts import PARTS
from moepage.paging.gguf_header import parse_gguf_header
from moepage.paging.gguf_resident import write_resident_gguf
from moepage.paging.hub_source import MAX_REQUEST, HubRepo
from moepage.paging.pread import CheckpointError
from moepage.paging.sources import sha256_of

RESIDENT = "resident.gguf"
READ_AHEAD = 16 << 20  # bytes one request reads past what is asked for (never into an expert tensor)


class RemoteGGUF:
    """A GGUF file on the Hub as the header parser and the resident writer see a GGUFFile: path, size and
    read_bytes (range requests, reading ahead up to the next expert tensor), then metadata, field_types, tensors."""

    def __init__(self, repo: HubRepo, filename: str, size: int, etag: str | None):
        self.repo, self.filename, self.size, self.etag = repo, filename, size, etag
        self.path = f"{repo.repo_id}/{filename}"
        self._stops: list[int] = []  # starts of tensors never read here (the routed experts)
        self._buf, self._at = bytearray(), 0
        header = parse_gguf_header(self)
        self.version, self.metadata, self.tensors = header.version, header.metadata, header.tensors
        self.field_types = header.field_types

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise CheckpointError(f"{self.path}: GGUF metadata has no general.architecture")
        return arch

    def info(self, name: str, what: str = "tensor"):
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} ({what}) is missing from the GGUF file") from None

    def skip(self, names: set[str]):
        self._stops = sorted(self.tensors[n].start for n in names if n in self.tensors)

    def read_bytes(self, start: int, length: int) -> bytearray:
        end = start + length
        if start < 0 or end > self.size:
            raise CheckpointError(f"{self.path}: bytes [{start}, {end}) lie outside the file ({self.size} bytes)")
        if self._at <= start and end <= self._at + len(self._buf):
            return self._buf[start - self._at : end - self._at]
        if self._stops:  # the resident tensors: read ahead, never into an expert tensor
            i = bisect.bisect_left(self._stops, end)
            stop = min(self._stops[i] if i < len(self._stops) else self.size, start + max(length, READ_AHEAD))
        else:  # the header: the parser asks for windows of its own
            stop = end
        buf = bytearray()
        for a in range(start, max(stop, end), MAX_REQUEST):
            buf += self.repo.read_range(self.filename, a, min(max(stop, end), a + MAX_REQUEST), self.etag)
        self._buf, self._at = buf, start
        return buf[:length]


def from_gguf(repo: HubRepo, out: str, filename: str, log) -> dict:
    """Write out/resident.gguf and out/moepage.json for the Hub GGUF `filename`; returns hub.json's fields."""
    import json

    from huggingface_hub import get_hf_file_metadata

    from moepage.engine.checkpoint import MANIFEST
    from moepage.paging.disk_tier import write_atomic

    meta = get_hf_file_metadata(repo.url(filename))
    if meta.size is None or not meta.etag:
        raise CheckpointError(f"{repo.repo_id}/{filename}: the Hub gave no size or ETag")
    src = RemoteGGUF(repo, filename, meta.size, meta.etag)
    embed = src.info("token_embd.weight", "token embeddings")
    config = gguf_config(src.metadata, set(src.tensors), vocab_size=embed.shape[0], path=src.path)
    family, args = model_args_of(config, f"{src.path} (GGUF metadata)")
    experts, shard_metadata, skip = {}, {}, set()
    for layer in args.moe_layers:
        infos = {p: src.info(common.GGUF_EXPERTS[p].format(L=layer), f"layer {layer} experts {p}") for p in PARTS}
        skip |= {i.name for i in infos.values()}
        for p, i in infos.items():
            if len(i.shape) != 3 or i.shape[0] != args.num_experts or i.nbytes % args.num_experts:
                raise CheckpointError(f"{src.path}: tensor {i.name!r} has shape {list(i.shape)}, not "
                                      f"[{args.num_experts}, rows, columns]")
        for e in range(args.num_experts):
            rel = split_shard_path(layer, e)
            parts, md = [], {"format": "moepage-gguf-expert"}
            for p, i in infos.items():
                each = i.nbytes // args.num_experts
                parts.append([filename, p, "U8", [each], i.start + e * each, i.start + (e + 1) * each])
                md[f"{p}.type"] = i.type.name
                md[f"{p}.shape"] = ",".join(str(s) for s in i.shape[1:])
            experts[rel], shard_metadata[rel] = parts, md
    src.skip(skip)
    log(f"downloading {len(src.tensors) - len(skip)} resident tensors of {filename} by range")
    tmp = os.path.join(out, f".{RESIDENT}.{os.getpid()}{TMP_SUFFIX}")
    write_resident_gguf(src, tmp, skip)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest, size = sha256_of(tmp), os.path.getsize(tmp)
    os.replace(tmp, os.path.join(out, RESIDENT))
    fsync_dir(out)
    manifest = {
        "format": "moepage-split", "source_format": "gguf", "version": 1, "source": f"hf://{src.path}",
        "config": config, "resident": RESIDENT,
        "experts": {"layout": "experts/L{layer:03d}/E{expert:04d}.safetensors", "parts": list(PARTS),
                    "moe_layers": args.moe_layers, "num_experts": args.num_experts},
        "files": {RESIDENT: {"sha256": digest, "bytes": size}},
    }
    write_atomic(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    return {"kind": "ranges", "file": filename, "files": {filename: {"etag": meta.etag, "size": meta.size}},
            "experts": experts, "shard_metadata": shard_metadata}
