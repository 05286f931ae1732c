"""Experts on the Hugging Face Hub, fetched on their first miss by HTTP range request and kept in the disk tier.

A lazy model directory (engine/hub_lazy.py writes it) is a `moepage split` directory whose expert shards are
not there yet, plus hub.json naming the repo, the commit and how each shard is made:
- "split": the repo is a `moepage split` upload; a shard is the repo's file of the same path, fetched whole in one
  request and checked against the manifest's sha256 before it is written.
- "ranges": the repo is an original safetensors checkpoint or a GGUF file; a shard is built from its expert's
  tensors (a GGUF: its slices of the three [E, ., .] expert tensors), each read by a range request into the Hub
  file (offsets from that file's header), and written as a safetensors file (for a GGUF, in the layout of a GGUF
  split). Its sha256 is recorded on the first fetch against the Hub file's ETag (disk_tier.HashLog); a later fetch
  of the same expert must give the same bytes.
Requests go through huggingface_hub (hf_hub_url, build_hf_headers: endpoint, token; http_stream_backoff: retries).

Shape legend: none (bytes only).
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import torch

from moepage.paging.disk_tier import DiskTier, HashLog, TierStats
from moepage.paging.gguf_experts import GGUFSplitExpertSource
from moepage.paging.hub_plan import LAZY_FILE, HubPlan, coalesced, load_hub_plan
from moepage.paging.pread import ALIGN, CheckpointError, ExpertReadError
from moepage.paging.safetensors_file import DTYPES
from moepage.paging.sources import ShardFiles, SplitExpertSource

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


class TierShards(ShardFiles):
    """ShardFiles over the disk tier: a file evicted and fetched again is a new file, so what was known of the old
    one is forgotten (else the new one would look 'changed since loaded'), and it is always sha256-checked."""

    def forget(self, rel: str):
        with self._lock:
            self._known.pop(rel, None)


class HubTier:
    """Mixed into a split source (safetensors or GGUF): its shards come from the disk tier, fetched from the Hub
    on a miss. `_init_tier` replaces the source's ShardFiles; everything else of the source is unchanged."""

    def _init_tier(self, root: str, shard_path, hashes: dict[str, str], drop_page_cache: bool, plan: HubPlan):
        self.root = root
        self.shards = TierShards(root, shard_path, hashes, drop_page_cache, verify=True)
        self.plan = plan
        self.repo = HubRepo(plan.repo_id, plan.commit)
        self.stats = TierStats()
        self.tier = DiskTier(root, stats=self.stats)
        self.tier.forget_hooks.append(self.shards.forget)
        self.hash_log = HashLog(f"{root}/{HASH_LOG}")
        if plan.kind == "ranges":
            etags = {rel: plan.etag_of(rel) for rel in plan.plans}
            for rel, (sha, _) in self.hash_log.load(etags).items():
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
        if self.plan.kind == "ranges":
            return sum(t.end - t.start for t in self.plan.plans.get(rel, []))
        return self.plan.sizes.get(rel, 0)

    def staging_nbytes(self, layer: int) -> int:
        if getattr(self, "encoding", None) is None:
            return 0
        sizes, e = [], 0
        while (rel := self.shards.shard_path(layer, e)) in self.plan.sizes:
            sizes.append(self.plan.sizes[rel])
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
            data = self._fetch_split(rel) if self.plan.kind == "split" else self._fetch_ranges(rel)
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
        if rel not in self.shards.hashes or rel not in self.plan.sizes:
            raise ExpertReadError(f"{self.root}: the manifest lists no shard {rel!r}")
        data = self.repo.read_range(rel, 0, self.plan.sizes[rel])
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.shards.hashes[rel]:
            raise HubUnavailable(f"{self.repo.repo_id}/{rel}: the Hub's copy does not match the manifest's sha256 "
                                 f"({self.shards.hashes[rel][:16]}…, got {digest[:16]}…)")
        return data

    def _fetch_ranges(self, rel: str) -> bytes:
        from safetensors.torch import save

        if rel not in self.plan.plans:
            raise ExpertReadError(f"{self.root}/{LAZY_FILE}: no Hub tensors recorded for {rel!r}")
        tensors = {}
        for file, start, end, parts in coalesced(self.plan.plans[rel]):
            raw = bytearray(self.repo.read_range(file, start, end, self.plan.file_etags.get(file)))
            for t in parts:
                piece = raw[t.start - start : t.end - start]
                tensors[t.name] = torch.frombuffer(piece, dtype=DTYPES[t.dtype]).view(t.shape) if piece else \
                    torch.empty(t.shape, dtype=DTYPES[t.dtype])
        data = save(tensors, metadata=self.plan.shard_metadata.get(rel, {"format": "pt"}))
        digest = hashlib.sha256(data).hexdigest()
        known = self.shards.hashes.get(rel)
        if known is None:
            self.hash_log.append(rel, digest, len(data), self.plan.etag_of(rel))  # recorded before the file is written
            self.shards.hashes[rel] = digest
        elif digest != known:
            raise HubUnavailable(f"{self.repo.repo_id}: {rel} fetched again differs from its first fetch (sha256 "
                                 f"{known[:16]}…, now {digest[:16]}…) though the file's ETag is the same")
        return data


class HubExpertSource(HubTier, SplitExpertSource):
    """A lazy safetensors model's experts (float tensors per expert)."""

    def __init__(self, root: str, shard_path, expert_table, hashes: dict[str, str], drop_page_cache: bool,
                 encoding: str | None, plan: HubPlan):
        SplitExpertSource.__init__(self, root, shard_path, expert_table, hashes, drop_page_cache, True, encoding)
        self._init_tier(root, shard_path, hashes, drop_page_cache, plan)


class HubGGUFExpertSource(HubTier, GGUFSplitExpertSource):
    """A lazy GGUF model's experts (each shard the raw GGML bytes of gate, up and down)."""

    def __init__(self, root: str, shard_path, hashes: dict[str, str], moe_layers: list[int], drop_page_cache: bool,
                 plan: HubPlan):
        from moepage.kernels.ggml import ggml_type, is_quantized

        self._init_tier(root, shard_path, hashes, drop_page_cache, plan)
        first = plan.shard_metadata.get(shard_path(moe_layers[0], 0)) if moe_layers else None
        if first is not None:  # a GGUF on the Hub: hub.json knows the types (no fetch, so an offline start works)
            try:
                self.quantized = any(is_quantized(ggml_type(first[f"{p}.type"], p)) for p in ("gate", "up", "down"))
            except (KeyError, ValueError):
                raise CheckpointError(f"{root}/{LAZY_FILE}: shard_metadata lacks the experts' GGML types") from None
        else:  # a GGUF split upload: the first shard says (fetched now if the tier lacks it)
            self.quantized = any(self._read(layer, 0).quantized for layer in moe_layers[:1])


def hub_expert_source(root: str, manifest: dict, shard_path, hashes: dict[str, str], drop_page_cache: bool,
                      expert_table=None, moe_layers: list[int] | None = None) -> HubTier:
    """The expert source of a lazy directory: safetensors experts with expert_table, GGUF ones with moe_layers."""
    plan = load_hub_plan(root, manifest)
    if expert_table is not None:
        return HubExpertSource(root, shard_path, expert_table, hashes, drop_page_cache,
                               manifest.get("expert_encoding"), plan)
    return HubGGUFExpertSource(root, shard_path, hashes, moe_layers or [], drop_page_cache, plan)


def configure_disk_tier(source, budget: int | None, moe_layers: list[int], readers: int) -> str:
    """Give a lazy model's disk tier its budget (files beyond it leave now); the start-up line describing it.
    The budget must hold one expert per reading thread and one more (each pins its file while it reads it)."""
    from moepage.paging.budget import human

    if not isinstance(source, HubTier):
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
