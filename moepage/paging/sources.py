"""Expert sources: where the bytes of one routed expert come from.

Shape legend: I expert intermediate size, H hidden size.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from moepage.paging.bf16_12bit import ENCODING, PARTS, EncodingError, Packed, unpack_into
from moepage.paging.model_paths import resolve_model_file
from moepage.paging.pread import ALIGN, ExpertReadError, PreadFile, aligned_bytes, file_stamp, span_bytes
from moepage.paging.safetensors_file import CheckpointError, SafetensorsFile, shown

Shapes = dict[str, tuple[int, ...]]  # part (gate, up, down) -> the shape the config implies


@dataclass
class ExpertWeights:
    """Raw weights of one routed expert: gate [I, H], up [I, H], down [H, I]; read_nbytes = bytes read from disk
    for them when that differs from their size (an encoded shard)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    read_nbytes: int | None = None

    @property
    def nbytes(self) -> int:
        if self.read_nbytes is not None:
            return self.read_nbytes
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


class ExpertSource(ABC):
    """Reads one routed expert's weights, each tensor one contiguous byte range."""

    reads_into = False  # read(..., into=buf) places the weights in buf (a recycled cache slot)
    expected: Shapes | None = None

    @abstractmethod
    def read(self, layer: int, expert: int, into: torch.Tensor | None = None) -> ExpertWeights: ...

    def expect(self, shapes: Shapes, layers: list[int], num_experts: int):
        """The shapes the config implies for every expert; checked at load where the source can do so cheaply,
        else at each page-in."""
        self.expected = shapes

    @abstractmethod
    def stored_nbytes(self, layer: int) -> int:
        """Bytes one expert of `layer` occupies on disk."""

    def staging_nbytes(self, layer: int) -> int:
        """Bytes of the buffer each reading thread keeps for `layer`'s experts (0: reads land in cache slots)."""
        return 0

    @abstractmethod
    def describe(self) -> str: ...


def sha256_of(path: str, chunk: int = 8 << 20) -> str:
    """sha256 of a regular file (anything else is a CheckpointError: /dev/zero never ends)."""
    f = PreadFile(path, what="file")
    try:
        h, at = hashlib.sha256(), 0
        while at < f.size:
            block = f.read_bytes(at, min(chunk, f.size - at))
            h.update(block)
            at += len(block)
        return h.hexdigest()
    finally:
        f.close()


def changed_error(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: changed since it was loaded ({what}); restart the server or run `moepage verify`")


def check_unchanged(f: PreadFile, what: str):
    if f.changed():
        raise changed_error(f.path, what)


def check_shape(path: str, name: str, shape, want, what: str):
    if tuple(shape) != tuple(want):
        raise CheckpointError(f"{path}: {what}: tensor {name!r} has shape {list(shape)}, the config implies "
                              f"{list(want)}")


@contextmanager
def paging_in(layer: int, expert: int):
    """Any failure reading one expert becomes ExpertReadError (a server fault while serving), naming the expert."""
    try:
        yield
    except ExpertReadError:
        raise
    except (CheckpointError, EncodingError, OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        what = f"layer {layer} expert {expert}"
        raise ExpertReadError(str(e) if what in str(e) else f"{e} ({what})") from None


def read_parts(files: dict[str, SafetensorsFile], names: dict[str, str], into: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """{part: tensor} for one expert; parts that lie back to back in one file come from a single read (into `into`,
    an aligned uint8 buffer, when given and every part lies in that one span)."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[int, list[str]] = {}
    for part, f in files.items():
        by_file.setdefault(id(f), []).append(part)
    for parts in by_file.values():
        f = files[parts[0]]
        infos = sorted(((f.tensors[names[p]], p) for p in parts), key=lambda t: t[0].start)
        if all(a.end == b.start for (a, _), (b, _) in zip(infos, infos[1:])):
            start, end = infos[0][0].start, infos[-1][0].end
            fits = into is not None and len(by_file) == 1 and into.numel() >= span_bytes(start, end)
            span = f.read_span(start, end, into if fits else None)
            for info, p in infos:
                out[p] = f.tensor_in(span, info, infos[0][0].start)
        else:
            for info, p in infos:
                out[p] = f.read(names[p])
    return out


_staging = threading.local()  # per page-in thread: the aligned buffer encoded shards are read into, reused


def staging_bytes(n: int) -> torch.Tensor:
    """This thread's reusable aligned read buffer, at least n bytes (grown when a larger shard comes)."""
    buf = getattr(_staging, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _staging.buf = aligned_bytes(n)
    return buf


def read_encoded_expert(f: SafetensorsFile, names: dict[str, str], what: str, into: torch.Tensor | None = None,
                        expected: Shapes | None = None) -> ExpertWeights:
    """One expert from a bf16-12bit shard: the whole file body in one read (into this thread's staging buffer),
    decoded into one bf16 buffer (`into`, uint8, when given) that holds gate, up and down back to back (so gate and up
    are one [2I, H] tensor with no copy)."""
    try:
        shapes = json.loads(f.metadata["shapes"])
        shapes = {name: [int(d) for d in shapes[name]] for name in names.values()}
        if any(d < 0 for shape in shapes.values() for d in shape):
            raise ValueError
        sizes = {p: math.prod(shapes[name]) for p, name in names.items()}
    except (KeyError, TypeError, ValueError, RecursionError):
        raise CheckpointError(f"{f.path}: {what}: missing or malformed 'shapes' metadata for {ENCODING}") from None
    for p, name in names.items():
        if expected is not None:
            check_shape(f.path, name, shapes[name], expected[p], f"{what} {p}")
    infos = {}
    for p, name in names.items():
        for part in PARTS:
            key = f"{name}.{part}"
            if key not in f.tensors:
                raise CheckpointError(f"{f.path}: tensor {key!r} ({what} {p}) is missing")
            infos[(p, part)] = f.tensors[key]
        if infos[(p, "lo")].nbytes != sizes[p]:  # checked before anything is allocated for the shapes
            raise CheckpointError(f"{f.path}: {what} {p}: shape {shapes[name]} does not match its "
                                  f"{infos[(p, 'lo')].nbytes} low bytes")
    start, end = min(i.start for i in infos.values()), max(i.end for i in infos.values())
    span = f.read_span(start, end, staging_bytes(span_bytes(start, end)))
    total = sum(sizes.values())
    if into is not None and into.numel() >= 2 * total:
        out = into[: 2 * total].view(torch.bfloat16)
    else:
        out = torch.empty(total, dtype=torch.bfloat16)
    views, at = {}, 0
    for p, name in names.items():
        packed = Packed(*(f.tensor_in(span, infos[(p, part)], start) for part in PARTS))
        try:
            unpack_into(packed, out[at : at + sizes[p]])
        except EncodingError as e:
            raise CheckpointError(f"{f.path}: {what} {p}: {e}") from None
        views[p] = out[at : at + sizes[p]].view(*shapes[name])
        at += sizes[p]
    return ExpertWeights(**views, read_nbytes=span.numel())


class TensorIndex:
    """Tensor name -> the safetensors file that holds it, for one checkpoint."""

    def __init__(self, files: list[SafetensorsFile]):
        self.files = files
        self.where: dict[str, SafetensorsFile] = {}
        for f in files:
            for name in f.tensors:
                self.where[name] = f

    def has(self, name: str) -> bool:
        return name in self.where

    def file_of(self, name: str, what: str) -> SafetensorsFile:
        try:
            return self.where[name]
        except KeyError:
            files = ", ".join(os.path.basename(f.path) for f in self.files) or "no files"
            raise CheckpointError(f"tensor {name!r} ({what}) is missing from the checkpoint ({files})") from None

    def read(self, name: str, what: str) -> torch.Tensor:
        return self.file_of(name, what).read(name)

    def info(self, name: str, what: str):
        return self.file_of(name, what).tensors[name]


class SafetensorsExpertSource(ExpertSource):
    """Experts stored as per-expert tensors in the safetensors shards of an original HF checkpoint."""

    def __init__(self, index: TensorIndex, expert_table: dict[str, str]):
        self.index = index
        self.table = expert_table

    def names(self, layer: int, expert: int) -> dict[str, str]:
        return {part: t.format(L=layer, E=expert) for part, t in self.table.items()}

    reads_into = True

    def expect(self, shapes: Shapes, layers: list[int], num_experts: int):
        """Every expert tensor's header entry checked now: present, floating point, the implied shape."""
        super().expect(shapes, layers, num_experts)
        for layer in layers:
            for e in range(num_experts):
                for p, n in self.names(layer, e).items():
                    f = self.index.file_of(n, f"layer {layer} expert {e} {p}")
                    info = f.tensors[n]
                    check_shape(f.path, n, info.shape, shapes[p], f"layer {layer} expert {e} {p}")
                    if not info.dtype.is_floating_point:
                        raise CheckpointError(f"{f.path}: tensor {n!r} is {info.dtype}, not floating point")

    def read(self, layer: int, expert: int, into: torch.Tensor | None = None) -> ExpertWeights:
        with paging_in(layer, expert):
            names = self.names(layer, expert)
            files = {p: self.index.file_of(n, f"layer {layer} expert {expert} {p}") for p, n in names.items()}
            for f in {id(f): f for f in files.values()}.values():
                check_unchanged(f, f"layer {layer} expert {expert}")
            return ExpertWeights(**read_parts(files, names, into))

    def stored_nbytes(self, layer: int) -> int:
        return sum(self.index.info(n, "expert").nbytes for n in self.names(layer, 0).values())

    def describe(self) -> str:
        return f"safetensors ({len(self.index.files)} files)"


class ShardFiles:
    """The per-expert files of a `moepage split` directory, each sha256-checked against the manifest the first
    time it is opened (a corrupt or missing shard is an error naming the file, layer and expert). What the file was
    then (size, mtime, inode) is kept with its parsed header: a later open of a file that differs is refused."""

    def __init__(self, root: str, shard_path: Callable[[int, int], str], hashes: dict[str, str],
                 drop_page_cache: bool = True, verify: bool = True):
        self.root = root
        self.shard_path = shard_path  # (layer, expert) -> path relative to root
        self.hashes = hashes
        self.drop_page_cache = drop_page_cache
        self.verify = verify
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}
        self._known: dict[str, tuple] = {}  # rel -> (stamp, tensors, metadata): a page-in reads only the body

    def expert_nbytes(self, layer: int) -> int:
        """Bytes of one expert's tensors in `layer` (every expert of a layer has the same shapes)."""
        if layer not in self._sizes:
            f = self.open(layer, 0)
            try:
                self._sizes[layer] = sum(i.nbytes for i in f.tensors.values())
            finally:
                f.close()
        return self._sizes[layer]

    def open(self, layer: int, expert: int) -> SafetensorsFile:
        rel = self.shard_path(layer, expert)
        what = f"layer {layer} expert {expert}"
        path = resolve_model_file(self.root, rel, f"expert shard for {what}")
        known = self._known.get(rel)
        if known is not None:
            f = SafetensorsFile(path, drop_page_cache=self.drop_page_cache, header=known[1:])
            if f.stamp != known[0]:
                f.close()
                raise changed_error(path, what)
            return f
        before = file_stamp(os.stat(path))
        if self.verify and rel in self.hashes:
            digest = sha256_of(path)
            if digest != self.hashes[rel]:
                raise CheckpointError(
                    f"{path}: sha256 mismatch for {what} (manifest {self.hashes[rel][:16]}…, file {digest[:16]}…): "
                    f"the shard is corrupt; run `moepage verify {self.root}`"
                )
        try:
            f = SafetensorsFile(path, drop_page_cache=self.drop_page_cache)
        except CheckpointError as e:
            raise CheckpointError(f"{e} ({what})") from None
        if f.stamp != before:
            f.close()
            raise changed_error(path, what)
        with self._lock:
            self._known[rel] = (f.stamp, f.tensors, f.metadata)
        return f


class SplitExpertSource(ExpertSource):
    """A `moepage split` directory: one small safetensors file per expert, sha256 checked at first page-in.
    encoding "bf16-12bit" (`moepage split --lossless`): each tensor stored in the lossless 12-bit form."""

    def __init__(self, root: str, shard_path: Callable[[int, int], str], expert_table: dict[str, str],
                 hashes: dict[str, str], drop_page_cache: bool = True, verify: bool = True, encoding: str | None = None):
        if encoding not in (None, ENCODING):
            raise CheckpointError(f"{root}: unknown expert encoding {shown(encoding)} (this moepage reads {ENCODING!r})")
        self.root = root
        self.shards = ShardFiles(root, shard_path, hashes, drop_page_cache, verify)
        self.table = expert_table
        self.encoding = encoding
        self._staging: dict[int, int] = {}

    def _open(self, layer: int, expert: int) -> SafetensorsFile:
        return self.shards.open(layer, expert)

    reads_into = True

    def read(self, layer: int, expert: int, into: torch.Tensor | None = None) -> ExpertWeights:
        with paging_in(layer, expert):
            f = self._open(layer, expert)
            try:
                names = {part: t.format(L=layer, E=expert) for part, t in self.table.items()}
                what = f"layer {layer} expert {expert}"
                if self.encoding == ENCODING:
                    return read_encoded_expert(f, names, what, into, self.expected)
                for part, name in names.items():
                    if name not in f.tensors:
                        raise CheckpointError(f"{f.path}: tensor {name!r} ({what} {part}) is missing")
                    if self.expected is not None:
                        check_shape(f.path, name, f.tensors[name].shape, self.expected[part], f"{what} {part}")
                return ExpertWeights(**read_parts({p: f for p in names}, names, into))
            finally:
                f.close()

    def stored_nbytes(self, layer: int) -> int:
        return self.shards.expert_nbytes(layer)

    def staging_nbytes(self, layer: int) -> int:
        """Encoded shards are read whole into a per-thread buffer and decoded from there into the slot: the
        layer's largest shard file (escape lists differ by expert) bounds that read, widened to ALIGN."""
        if self.encoding != ENCODING:
            return 0
        if layer not in self._staging:
            sizes, e = [], 0
            while (rel := self.shards.shard_path(layer, e)) in self.shards.hashes:
                try:
                    sizes.append(os.path.getsize(os.path.join(self.root, rel)))
                except OSError:
                    pass  # a missing shard is reported, naming it, when it is read
                e += 1
            self._staging[layer] = max(sizes, default=self.stored_nbytes(layer)) + 2 * ALIGN
        return self._staging[layer]

    def describe(self) -> str:
        return f"split shards in {self.root}"
