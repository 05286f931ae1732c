"""Experts on the Hugging Face Hub, fetched on their first miss by HTTP range request and kept in the disk tier.

A lazy model directory (engine/hub_lazy.py writes it) is a `moepage split` directory whose expert shards are
not there yet, plus hub.json naming the repo, the commit and how each shard is made:
- "split": the repo is a `moepage split` upload; a shard is the repo's file of the same path, fetched whole in one
  request and checked against the manifest's sha256 before it is written.
- "ranges": the repo is an original safetensors checkpoint; a shard is built from its expert's tensors, each read
  by a range request into the Hub file (offsets from that file's header), and written as a safetensors file. Its
  sha256 is recorded on the first fetch against the Hub file's ETag (disk_tier.HashLog); a later fetch of the same
  expert must give the same bytes.
Requests go through huggingface_hub (hf_hub_url, build_hf_headers: endpoint, token; http_stream_backoff: retries).

Shape legend: none (bytes only).
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass

import torch

from moepage.paging.disk_tier import DiskTier, HashLog, TierStats
from moepage.paging.pread import ALIGN, CheckpointError, ExpertReadError
from moepage.paging.safetensors_file import DTYPES
from moepage.paging.sources import ShardFiles, SplitExpertSource

LAZY_FILE = "hub.json"  # the marker of a lazy directory
LAZY_FORMAT = "moepage-hub-lazy"
HASH_LOG = "expert-hashes.txt"
MAX_REQUEST = 64 << 20  # bytes one range request asks for (bigger files are read in several)


class HubUnavailable(ExpertReadError):
    """The Hub could not give bytes (offline, unreachable, an HTTP error): a server fault for that request."""


@dataclass
class HubRepo:
    """One commit of a Hub model repo, read by byte range."""

    repo_id: str
    commit: str
    token: str | bool | None = None  # None: huggingface_hub's own (HF_TOKEN, `hf auth login`)
    timeout_s: float = 30.0
    retries: int = 2  # huggingface_hub's backoff: 1 s, then 2 s

    def url(self, filename: str) -> str:
        from huggingface_hub import constants, hf_hub_url

        return hf_hub_url(self.repo_id, filename, revision=self.commit, endpoint=constants.ENDPOINT)

    def read_range(self, filename: str, start: int, end: int, etag: str | None = None) -> bytes:
        """Bytes [start, end) of the file: one GET with a Range header; at most end - start bytes are accepted."""
        if end <= start:
            return b""
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        where = f"{self.repo_id}/{filename}@{self.commit[:12]}"
        if constants.is_offline_mode():
            raise HubUnavailable(f"{where}: not in the disk tier, and HF_HUB_OFFLINE=1 forbids fetching it")
        headers = build_hf_headers(token=self.token)
        headers.update({"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
        want = end - start
        try:
            with http_stream_backoff("GET", self.url(filename), headers=headers, timeout=self.timeout_s,
                                     max_retries=self.retries) as r:
                hf_raise_for_status(r)
                _check_range(r, start, end, where)
                if etag is not None and not r.history:  # a redirect leads to a CDN with ETags of its own
                    got = (r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or "").lstrip("W/").strip('"')
                    if got and got != etag:
                        raise HubUnavailable(f"{where}: changed on the Hub (ETag {got[:16]}, expected {etag[:16]})")
                buf = bytearray()
                for chunk in r.iter_bytes():
                    buf += chunk
                    if len(buf) > want:
                        raise HubUnavailable(f"{where}: the Hub sent more than the {want} bytes asked for")
        except ExpertReadError:
            raise
        except Exception as e:  # httpx errors, HfHubHTTPError, OfflineModeIsEnabled: this fetch failed, not the server
            first = str(e).splitlines()[0] if str(e) else "no answer"
            raise HubUnavailable(f"{where}: fetching bytes [{start}, {end}) from the Hub failed "
                                 f"({type(e).__name__}: {first})") from None
        if len(buf) != want:
            raise HubUnavailable(f"{where}: the Hub sent {len(buf)} of the {want} bytes asked for")
        return bytes(buf)

    def read_file(self, filename: str, size: int, etag: str | None = None, sink=None) -> str:
        """The whole file (size bytes) in requests of at most MAX_REQUEST bytes, each passed to sink(bytes);
        returns its sha256."""
        h, at = hashlib.sha256(), 0
        while at < size:
            part = self.read_range(filename, at, min(size, at + MAX_REQUEST), etag)
            h.update(part)
            if sink is not None:
                sink(part)
            at += len(part)
        return h.hexdigest()


def _check_range(r, start: int, end: int, where: str):
    """A 206 whose Content-Range is exactly [start, end), or a 200 that is the whole file and nothing more."""
    if r.status_code == 206:
        got = r.headers.get("Content-Range", "")
        if not got.startswith(f"bytes {start}-{end - 1}/"):
            raise HubUnavailable(f"{where}: asked for bytes {start}-{end - 1}, the Hub answered {got[:60]!r}")
    elif r.status_code == 200:
        length = r.headers.get("Content-Length")
        if start != 0 or length != str(end):
            raise HubUnavailable(f"{where}: the Hub ignored the byte range (HTTP 200 for bytes {start}-{end - 1})")
    else:
        raise HubUnavailable(f"{where}: unexpected HTTP {r.status_code} for a byte range")


@dataclass(frozen=True)
class RemoteTensor:
    """One tensor of one expert as it lies in a Hub file."""

    file: str
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    start: int
    end: int


def check_remote_tensor(t: RemoteTensor, file_size: int, where: str):
    """Offsets inside the file, the span the shape and dtype need (hub.json is a file: checked before use)."""
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


class TierShards(ShardFiles):
    """ShardFiles over the disk tier: a file evicted and fetched again is a new file, so what was known of the old
    one is forgotten (else the new one would look 'changed since loaded'), and it is always sha256-checked."""

    def forget(self, rel: str):
        with self._lock:
            self._known.pop(rel, None)


class HubExpertSource(SplitExpertSource):
    """A split source whose shards come from the disk tier, fetched from the Hub on a miss."""

    def __init__(self, root: str, shard_path, expert_table, hashes: dict[str, str], drop_page_cache: bool,
                 encoding: str | None, repo: HubRepo, kind: str, sizes: dict[str, int] | None = None,
                 plans: dict[str, list[RemoteTensor]] | None = None, file_etags: dict[str, str] | None = None):
        super().__init__(root, shard_path, expert_table, hashes, drop_page_cache, True, encoding)
        if kind not in ("split", "ranges"):
            raise CheckpointError(f"{root}/{LAZY_FILE}: unknown kind {kind!r}")
        self.shards = TierShards(root, shard_path, hashes, drop_page_cache, verify=True)
        self.repo, self.kind = repo, kind
        self.sizes = sizes or {}  # split: rel -> bytes from the manifest
        self.plans = plans or {}  # ranges: rel -> its tensors on the Hub
        self.file_etags = file_etags or {}  # ranges: Hub file -> its ETag
        self.etags = {rel: "+".join(sorted({self.file_etags[t.file] for t in ts}))  # rel -> ETag(s) of its bytes
                      for rel, ts in self.plans.items()}
        self.stats = TierStats()
        self.tier = DiskTier(root, stats=self.stats)
        self.tier.forget_hooks.append(self.shards.forget)
        self.hash_log = HashLog(f"{root}/{HASH_LOG}")
        if kind == "ranges":
            for rel, (sha, _) in self.hash_log.load(self.etags).items():
                hashes[rel] = sha
        for rel in self.tier.keys():  # a file the tier holds but nothing vouches for (killed before its hash): out
            if rel not in hashes:
                self.tier.drop(rel)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def describe(self) -> str:
        return f"Hub {self.repo.repo_id}@{self.repo.commit[:12]} (lazy, disk tier in {self.root})"

    def stored_nbytes(self, layer: int) -> int:
        """From hub.json or the manifest: nothing is fetched to learn an expert's size."""
        rel = self.shards.shard_path(layer, 0)
        if self.kind == "ranges":
            return sum(t.end - t.start for t in self.plans.get(rel, []))
        return self.sizes.get(rel, 0)

    def staging_nbytes(self, layer: int) -> int:
        if self.encoding is None:
            return 0
        sizes, e = [], 0
        while (rel := self.shards.shard_path(layer, e)) in self.sizes:
            sizes.append(self.sizes[rel])
            e += 1
        return max(sizes, default=0) + 2 * ALIGN

    def _open(self, layer: int, expert: int):
        rel = self.shards.shard_path(layer, expert)
        with self._key_lock(rel), self.tier.pinned(rel):
            if self.tier.lookup(rel) is None:
                self.fetch(rel)
            try:
                return self.shards.open(layer, expert)
            except CheckpointError:  # the file on disk no longer matches its hash: fetch it once more
                self.tier.drop(rel)
                self.fetch(rel)
                return self.shards.open(layer, expert)

    def _key_lock(self, rel: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(rel, threading.Lock())

    def ensure(self, layer: int, expert: int) -> bool:
        """Put the expert's shard in the disk tier (prefetch); False if it was there already."""
        rel = self.shards.shard_path(layer, expert)
        with self._key_lock(rel), self.tier.pinned(rel):
            if rel in self.tier:
                return False
            self.fetch(rel)
            return True

    def fetch(self, rel: str):
        """rel from the Hub into the disk tier, verified before it is written."""
        t0 = time.perf_counter()
        try:
            data = self._fetch_split(rel) if self.kind == "split" else self._fetch_ranges(rel)
        except ExpertReadError:
            with self.stats.lock:
                self.stats.hub_errors += 1
            raise
        with self.stats.lock:
            self.stats.hub_fetches += 1
            self.stats.hub_bytes += len(data)
            self.stats.fetch_seconds.observe(time.perf_counter() - t0)
        self.tier.store(rel, data)

    def _fetch_split(self, rel: str) -> bytes:
        if rel not in self.shards.hashes or rel not in self.sizes:
            raise ExpertReadError(f"{self.root}: the manifest lists no shard {rel!r}")
        data = self.repo.read_range(rel, 0, self.sizes[rel])
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.shards.hashes[rel]:
            raise HubUnavailable(f"{self.repo.repo_id}/{rel}: the Hub's copy does not match the manifest's sha256 "
                                 f"({self.shards.hashes[rel][:16]}…, got {digest[:16]}…)")
        return data

    def _fetch_ranges(self, rel: str) -> bytes:
        from safetensors.torch import save

        if rel not in self.plans:
            raise ExpertReadError(f"{self.root}/{LAZY_FILE}: no Hub tensors recorded for {rel!r}")
        tensors = {}
        for file, start, end, parts in coalesced(self.plans[rel]):
            raw = bytearray(self.repo.read_range(file, start, end, self.file_etags.get(file)))
            for t in parts:
                piece = raw[t.start - start : t.end - start]
                tensors[t.name] = torch.frombuffer(piece, dtype=DTYPES[t.dtype]).view(t.shape) if piece else \
                    torch.empty(t.shape, dtype=DTYPES[t.dtype])
        data = save(tensors, metadata={"format": "pt"})
        digest = hashlib.sha256(data).hexdigest()
        known = self.shards.hashes.get(rel)
        if known is None:
            self.hash_log.append(rel, digest, len(data), self.etags[rel])  # recorded before the file is written
            self.shards.hashes[rel] = digest
        elif digest != known:
            raise HubUnavailable(f"{self.repo.repo_id}: {rel} fetched again differs from its first fetch (sha256 "
                                 f"{known[:16]}…, now {digest[:16]}…) though the file's ETag is the same")
        return data


def _lazy_error(root: str, what: str) -> CheckpointError:
    return CheckpointError(f"{root}/{LAZY_FILE}: {what}")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def hub_expert_source(root: str, manifest: dict, shard_path, expert_table, hashes: dict[str, str],
                      drop_page_cache: bool) -> HubExpertSource:
    """The expert source of a lazy directory, from its hub.json and split manifest (every field checked)."""
    from moepage.paging.model_paths import read_model_json

    lazy = read_model_json(root, LAZY_FILE, "lazy Hub model description")
    if not isinstance(lazy, dict) or lazy.get("format") != LAZY_FORMAT or lazy.get("version") != 1:
        raise _lazy_error(root, f"not a {LAZY_FORMAT} version 1 description")
    repo_id, commit, kind = lazy.get("repo_id"), lazy.get("commit"), lazy.get("kind")
    if not (isinstance(repo_id, str) and isinstance(commit, str) and commit):
        raise _lazy_error(root, "repo_id and commit must be strings")
    repo = HubRepo(repo_id, commit)
    encoding = manifest.get("expert_encoding")
    if kind == "split":
        sizes = {}
        for rel, meta in manifest["files"].items():
            size = meta.get("size", meta.get("bytes"))
            if not _is_count(size):
                raise _lazy_error(root, f"the manifest's size of {rel!r} is not a byte count")
            sizes[rel] = size
        return HubExpertSource(root, shard_path, expert_table, hashes, drop_page_cache, encoding, repo, kind,
                               sizes=sizes)
    files, experts = lazy.get("files"), lazy.get("experts")
    if kind != "ranges" or not isinstance(files, dict) or not isinstance(experts, dict):
        raise _lazy_error(root, "kind must be 'split', or 'ranges' with files and experts maps")
    file_etags, plans = {}, {}
    for name, meta in files.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("etag"), str) and _is_count(meta.get("size"))):
            raise _lazy_error(root, f"files[{name!r}] must have an etag and a size")
        file_etags[name] = meta["etag"]
    for rel, entries in experts.items():
        if not isinstance(entries, list) or not entries:
            raise _lazy_error(root, f"experts[{rel!r}] must list the expert's tensors")
        plan = []
        for e in entries:
            try:
                file, name, dtype, shape, start, end = e
                t = RemoteTensor(file, name, dtype, tuple(shape), start, end)
                ok = (file in files and isinstance(name, str) and isinstance(dtype, str) and len(shape) <= 8
                      and all(_is_count(d) for d in shape) and _is_count(start) and _is_count(end))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise _lazy_error(root, f"experts[{rel!r}]: an entry is not [file, name, dtype, shape, start, end]")
            check_remote_tensor(t, files[file]["size"], f"{root}/{LAZY_FILE}: experts[{rel!r}]")
            plan.append(t)
        plans[rel] = plan
    return HubExpertSource(root, shard_path, expert_table, hashes, drop_page_cache, encoding, repo, kind,
                           plans=plans, file_etags=file_etags)


def configure_disk_tier(source, budget: int | None, moe_layers: list[int], readers: int) -> str:
    """Give a lazy model's disk tier its budget (files beyond it leave now); the start-up line describing it.
    The budget must hold one expert per reading thread and one more (each pins its file while it reads it)."""
    from moepage.paging.budget import human

    if not isinstance(source, HubExpertSource):
        raise ValueError("--lazy: the model's experts do not come from the Hub")
    if budget is not None:
        largest = max((source.stored_nbytes(layer) for layer in moe_layers), default=0) + (64 << 10)
        need = (max(1, readers) + 1) * largest
        if budget < need:
            raise ValueError(f"--disk-budget {human(budget)} is below {human(need)}: {max(1, readers) + 1} experts "
                             f"of up to {human(largest)} (one per --io-threads reader and one more)")
    source.tier.resize(budget)
    limit = "no limit" if budget is None else f"{human(budget)} (--disk-budget)"
    return (f"disk tier: {source.root}: {len(source.tier)} experts, {human(source.tier.used_bytes)} of {limit}; "
            f"misses are fetched from {source.repo.repo_id}@{source.repo.commit[:12]}")
