"""Fuzzing the model-file readers (DESIGN invariant 5) with hypothesis: safetensors headers, GGUF headers and
metadata, `moepage split` manifests.

For every example: the reader either accepts the file or raises one of moepage's own errors (CheckpointError and
its subclasses; ExpertReadError for a page-in); it allocates at most PEAK_BYTES (tracemalloc's peak, each file
being at most a few KB); it opens nothing outside the example's directory (an audit hook sees every open, and
resolves symlinks); and it finishes within the example deadline.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import tracemalloc
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import moepage
from moepage.engine.checkpoint import MANIFEST, open_checkpoint, split_shard_path
from moepage.engine.families import qwen3_moe
from moepage.engine.gguf_tokenizer import tokenizer_from_gguf
from moepage.engine.model_args import resident_shape
from moepage.engine.weight_names import resident_names, to_checkpoint
from moepage.paging.gguf_file import GGUFFile
from moepage.paging.pread import CheckpointError, ExpertReadError
from moepage.paging.safetensors_file import DTYPES, SafetensorsFile
from moepage.surgery.split import verify_split

PEAK_BYTES = 16 << 20
FUZZ = settings(max_examples=120, deadline=timedelta(seconds=3), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SECRET = b"root:x:0:0:fuzz-secret\n"
U64 = st.one_of(st.integers(0, 64), st.sampled_from([255, 4096, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63,
                                                     (1 << 64) - 1]), st.integers(0, (1 << 64) - 1))


class OpenWatch:
    """Every path opened while active (the 'open' audit event), to check none lies outside the example's dir."""

    def __init__(self):
        self.active, self.opened = False, []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.active and event == "open" and isinstance(args[0], (str, bytes)):
            self.opened.append(os.fsdecode(args[0]))

    def outside(self, root: str) -> list[str]:
        code = (sys.prefix, sys.base_prefix, os.path.dirname(moepage.__file__), "/proc", "/sys")  # lazy imports
        ignored = tuple({os.path.realpath(p) + os.sep for p in code} - {"//"})
        base = os.path.realpath(root)
        return [p for p in self.opened if not os.path.realpath(p).startswith((base + os.sep, *ignored))]


WATCH = OpenWatch()


def run_reader(root: str, fn, *args, allowed=(CheckpointError,)):
    """fn(*args) within the bounds; its result, or None when it refused with an allowed error."""
    WATCH.opened.clear()
    tracemalloc.start()
    WATCH.active = True
    try:
        return fn(*args)
    except allowed as e:
        message = str(e)
        assert "fuzz-secret" not in message and "\n" not in message
        return None
    finally:
        WATCH.active = False
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"peak traced allocation {peak} bytes"
        assert not WATCH.outside(root), f"opened outside the model directory: {WATCH.outside(root)}"


@pytest.fixture(scope="module")
def workdir():
    d = tempfile.mkdtemp(prefix="moepage-fuzz-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def fresh_dir(workdir: str) -> str:
    return tempfile.mkdtemp(dir=workdir)


def mostly(good, bad, odds: int = 4):
    """good, with one chance in `odds` of bad."""
    return st.sampled_from(range(odds)).flatmap(lambda k: bad if k == odds - 1 else good)


# ---- safetensors headers --------------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
ITEMSIZE = {name: torch.empty(0, dtype=d).element_size() for name, d in DTYPES.items()}


@st.composite
def safetensors_entry(draw, at: list) -> dict:
    dtype = draw(mostly(st.sampled_from(list(DTYPES)), st.sampled_from(["F8", "x", 3])))
    shape = draw(mostly(st.lists(st.integers(0, 4), max_size=3), st.lists(st.integers(-4, 8) | U64, max_size=9)))
    n = ITEMSIZE.get(dtype, 1)
    for d in shape:
        n *= d if isinstance(d, int) else 1
    start = draw(mostly(st.just(at[0]), st.integers(0, 80) | U64))
    end = draw(mostly(st.just(start + n), st.integers(0, 80) | U64))
    at[0] = max(at[0], end if isinstance(end, int) and end < 1 << 20 else at[0])
    entry = {"dtype": dtype, "shape": shape, "data_offsets": draw(mostly(st.just([start, end]), json_values))}
    return draw(mostly(st.just(entry), json_values, odds=8))


@st.composite
def safetensors_files(draw) -> bytes:
    at = [0]
    names = draw(st.lists(st.text(max_size=12), max_size=5, unique=True))
    header = {name: draw(safetensors_entry(at)) for name in names}
    if draw(st.booleans()):
        header["__metadata__"] = draw(mostly(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
                                             json_values))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8 if draw(mostly(st.just(True), st.just(False))) else draw(st.integers(0, 7)))
    length = draw(mostly(st.just(len(raw)), U64, odds=6))
    body = draw(mostly(st.binary(min_size=at[0], max_size=at[0]), st.binary(max_size=96)))
    return struct.pack("<Q", length) + raw + body


@FUZZ
@given(data=safetensors_files())
def test_safetensors_headers(workdir, data):
    root = fresh_dir(workdir)
    path = os.path.join(root, "w.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    st_file = run_reader(root, SafetensorsFile, path)
    if st_file is not None:
        for name in st_file.tensors:
            run_reader(root, st_file.read, name)
        st_file.close()


# ---- GGUF headers and metadata --------------------------------------------------------------------------------
QWEN3_META = {"general.architecture": 8, "qwen3moe.block_count": 4,
              "qwen3moe.embedding_length": 4, "qwen3moe.attention.head_count": 4, "qwen3moe.expert_count": 4,
              "qwen3moe.expert_used_count": 4, "qwen3moe.attention.head_count_kv": 4, "qwen3moe.context_length": 4,
              "tokenizer.ggml.model": 8, "tokenizer.ggml.tokens": 9, "tokenizer.ggml.merges": 9,
              "tokenizer.ggml.token_type": 9, "tokenizer.ggml.pre": 8}  # key -> its usual value type
STRINGS = {"general.architecture": [b"qwen3moe", b"llama", b"gpt2"], "tokenizer.ggml.model": [b"gpt2", b"llama"],
           "tokenizer.ggml.pre": [b"default", b"qwen2", b"nope"]}
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
GGML_TYPES = [(0, 1), (1, 1), (30, 1), (8, 32), (12, 256)]  # (type id, values per block)


def gstring(draw, text: bytes) -> bytes:
    return struct.pack("<Q", draw(mostly(st.just(len(text)), U64, odds=40))) + text


@st.composite
def gguf_value(draw, kind: int, key: str = "", depth: int = 0) -> bytes:
    if kind == 8:
        return gstring(draw, draw(mostly(st.sampled_from(STRINGS.get(key, [b"x"])), st.binary(max_size=16))))
    if kind == 9:
        sub = draw(mostly(st.sampled_from([8, 4, 6]), st.sampled_from([0, 7, 9, 12, 77] if depth == 0 else [4, 8])))
        items = [draw(gguf_value(sub, "", depth + 1)) for _ in range(draw(st.integers(0, 5)))]
        return struct.pack("<IQ", sub, draw(mostly(st.just(len(items)), U64, odds=12))) + b"".join(items)
    if kind in SCALAR_FORMATS:
        fmt = SCALAR_FORMATS[kind]
        if fmt[-1] in "fd":
            return struct.pack(fmt, draw(st.floats(width=32 if fmt[-1] == "f" else 64)))
        bits = struct.calcsize(fmt) * 8
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if fmt[-1].islower() else (0, (1 << bits) - 1)
        return struct.pack(fmt, draw(mostly(st.integers(max(lo, 0), min(hi, 300)), st.integers(lo, hi))))
    return draw(st.binary(max_size=8))  # an unknown type's "value"


TENSOR_NAMES = [b"output_norm.weight", b"blk.0.ffn_gate_inp.weight", b"blk.0.ffn_gate_exps.weight", b"t"]


@st.composite
def gguf_tensor(draw, name: bytes) -> bytes:
    kind, block = draw(mostly(st.sampled_from(GGML_TYPES), st.sampled_from([(99, 1), (8, 1)]), odds=10))
    shape = draw(mostly(st.lists(st.integers(1, 3), min_size=1, max_size=3).map(lambda s: [s[0] * block, *s[1:]]),
                        st.lists(st.integers(0, 64) | U64, max_size=5), odds=10))
    n_dims = draw(mostly(st.just(len(shape)), U64.map(lambda v: v & 0xFFFFFFFF), odds=12))
    offset = draw(mostly(st.sampled_from([0, 32, 64, 128]), U64, odds=10))
    return (gstring(draw, name) + struct.pack("<I", n_dims) + b"".join(struct.pack("<Q", d) for d in shape)
            + struct.pack("<IQ", kind, offset))


@st.composite
def gguf_files(draw) -> bytes:
    kvs = []
    for key in draw(st.lists(mostly(st.sampled_from(list(QWEN3_META)), st.text(max_size=10)), max_size=10, unique=True)):
        kind = draw(mostly(st.just(QWEN3_META.get(key, 4)), st.sampled_from([4, 8, 9, 6, 10, 7, 0, 12, 77])))
        kvs.append(gstring(draw, key.encode()) + struct.pack("<I", kind) + draw(gguf_value(kind, key)))
    names = draw(st.lists(st.sampled_from(TENSOR_NAMES), max_size=3, unique=True))
    names = draw(mostly(st.just([b"token_embd.weight", *names]), st.just(names)))
    tensors = [draw(gguf_tensor(name)) for name in names]
    version = draw(mostly(st.sampled_from([3, 2]), st.sampled_from([1, 4, 0, 3 << 24]), odds=10))
    n_tensors = draw(mostly(st.just(len(tensors)), U64, odds=12))
    n_kv = draw(mostly(st.just(len(kvs)), U64, odds=12))
    if draw(mostly(st.just(False), st.just(True), odds=10)):
        kvs.insert(0, gstring(draw, b"general.alignment") + struct.pack("<I", 4) + draw(gguf_value(4)))
    data = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    data += bytes(-len(data) % 32) + draw(mostly(st.just(bytes(1024)), st.binary(max_size=400)))
    return draw(mostly(st.just(data), st.integers(0, len(data)).map(lambda cut: data[:cut]), odds=8))


@FUZZ
@given(data=gguf_files())
def test_gguf_headers_and_metadata(workdir, data):
    root = fresh_dir(workdir)
    path = os.path.join(root, "m.gguf")
    with open(path, "wb") as f:
        f.write(data)
    g = run_reader(root, GGUFFile, path)
    if g is None:
        return
    for name in g.tensors:
        run_reader(root, g.read_quantized, name)
    run_reader(root, open_checkpoint, path)
    run_reader(root, tokenizer_from_gguf, {**g.metadata, "tokenizer.ggml.model": "gpt2"}, path)
    g.close()


GGUF_CONFIG = {"block_count": 1, "embedding_length": 8, "attention.head_count": 2, "attention.head_count_kv": 1,
               "attention.key_length": 4, "expert_count": 2, "expert_used_count": 1, "expert_feed_forward_length": 4,
               "context_length": 64}
TOKENS = [chr(ord("a") + i) for i in range(14)] + ["ab", "cd"]


def gguf_model_tensors() -> list[tuple[str, tuple[int, ...]]]:
    """A tiny qwen3moe's tensor table (torch order) from the same names and shapes the loader checks."""
    from moepage.engine.families import common
    from moepage.engine.model_args import expert_shapes

    config = {"model_type": "qwen3_moe", "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "num_experts": 2,
              "num_experts_per_tok": 1, "moe_intermediate_size": 4}
    args = qwen3_moe.model_args(config)
    out = [(to_checkpoint(common.GGUF, n), resident_shape(args, n)) for n in resident_names(args)]
    out += [(common.GGUF_EXPERTS[p].format(L=0), (2, *s)) for p, s in expert_shapes(args).items()]
    return out


def plain(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


@st.composite
def gguf_models(draw) -> bytes:
    """A well-formed GGUF of a tiny qwen3moe whose metadata values (and types) are fuzzed."""
    kvs = [(b"general.architecture", 8, plain(draw(mostly(st.just(b"qwen3moe"), st.binary(max_size=9), odds=20))))]
    for key, value in GGUF_CONFIG.items():
        if draw(mostly(st.just(True), st.just(False), odds=20)):
            kind = draw(mostly(st.just(4), st.sampled_from([0, 5, 6, 8, 9, 10, 11, 12]), odds=20))
            raw = struct.pack("<I", value) if kind == 4 and draw(mostly(st.just(True), st.just(False))) else \
                draw(gguf_value(kind))
            kvs.append((f"qwen3moe.{key}".encode(), kind, raw))
    arrays = {b"tokenizer.ggml.tokens": [t.encode() for t in TOKENS], b"tokenizer.ggml.merges": [b"a b", b"c d"]}
    kvs.append((b"tokenizer.ggml.model", 8, plain(draw(mostly(st.just(b"gpt2"), st.binary(max_size=5))))))
    for key, items in arrays.items():
        items = draw(mostly(st.just(items), st.lists(st.binary(max_size=4), max_size=20)))
        kvs.append((key, 9, struct.pack("<IQ", 8, len(items)) + b"".join(plain(i) for i in items)))
    types = draw(mostly(st.just([1] * 16), st.lists(st.integers(0, 7), max_size=20)))
    kvs.append((b"tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, len(types)) + struct.pack(f"<{len(types)}i", *types)))
    kvs.append((b"tokenizer.ggml.eos_token_id", 4, struct.pack("<I", draw(st.integers(0, 40)))))
    table, offset = [], 0
    for name, shape in gguf_model_tensors():
        shape = draw(mostly(st.just(shape), st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), odds=40))
        n = 4
        for d in shape:
            n *= d
        table.append(plain(name.encode()) + struct.pack("<I", len(shape))
                     + b"".join(struct.pack("<Q", d) for d in reversed(shape)) + struct.pack("<IQ", 0, offset))
        offset += -(-n // 32) * 32
    body = b"".join(struct.pack("<Q", len(k)) + k + struct.pack("<I", kind) + v for k, v, kind in
                    ((k, v, kind) for k, kind, v in kvs))
    data = b"GGUF" + struct.pack("<IQQ", 3, len(table), len(kvs)) + body + b"".join(table)
    return data + bytes(-len(data) % 32) + bytes(offset)


@FUZZ
@given(data=gguf_models())
def test_gguf_models_with_fuzzed_metadata(workdir, data):
    root = fresh_dir(workdir)
    path = os.path.join(root, "m.gguf")
    with open(path, "wb") as f:
        f.write(data)
    ckpt = run_reader(root, open_checkpoint, path)
    if ckpt is not None:
        run_reader(root, ckpt.experts.read_quantized, 0, 1, allowed=(ExpertReadError,))
        run_reader(root, ckpt.load_tokenizer, allowed=(CheckpointError, FileNotFoundError))
        ckpt.gguf.close()


gguf_token_meta = st.fixed_dictionaries({}, optional={
    "tokenizer.ggml.model": st.sampled_from(["gpt2", "llama"]) | json_values,
    "tokenizer.ggml.tokens": st.lists(st.text(max_size=4), max_size=8) | json_values,
    "tokenizer.ggml.merges": st.lists(st.text(max_size=6), max_size=6) | json_values,
    "tokenizer.ggml.token_type": st.lists(st.integers(0, 7), max_size=8) | json_values,
    "tokenizer.ggml.pre": st.sampled_from(["default", "qwen2", "nope"]) | json_values,
    "tokenizer.ggml.bos_token_id": st.integers(-2, 10) | json_values,
    "tokenizer.chat_template": st.text(max_size=10) | json_values,
})


@FUZZ
@given(meta=gguf_token_meta)
def test_gguf_tokenizer_metadata(workdir, meta):
    run_reader(workdir, tokenizer_from_gguf, meta, "m.gguf")


# ---- split manifests ------------------------------------------------------------------------------------------
CONFIG = {"model_type": "qwen3_moe", "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "num_experts": 2,
          "num_experts_per_tok": 1, "moe_intermediate_size": 4, "max_position_embeddings": 64}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def pristine_split(workdir):
    """A valid split directory of a tiny Qwen3-MoE, plus a secret outside it and hostile entries inside it."""
    base = os.path.join(workdir, "split-base")
    root = os.path.join(base, "model")
    os.makedirs(os.path.join(root, "experts", "L000"))
    with open(os.path.join(base, "secret"), "wb") as f:
        f.write(SECRET)
    args = qwen3_moe.model_args(CONFIG)
    g = torch.Generator().manual_seed(0)
    resident = {to_checkpoint(qwen3_moe.NAMES, n): torch.randn(resident_shape(args, n), generator=g)
                for n in resident_names(args)}
    save_file(resident, os.path.join(root, "resident.safetensors"))
    for e in range(2):
        shard = {t.format(L=0, E=e): torch.randn(s, generator=g)
                 for (p, t), s in zip(qwen3_moe.EXPERT_NAMES.items(), [(4, 8), (4, 8), (8, 4)])}
        save_file(shard, os.path.join(root, split_shard_path(0, e)))
    files = {}
    for rel in ["resident.safetensors", split_shard_path(0, 0), split_shard_path(0, 1)]:
        p = os.path.join(root, rel)
        files[rel] = {"size": os.path.getsize(p), "sha256": sha256(p)}
    manifest = {"format": "moepage-split", "version": 1, "source_format": "hf", "config": CONFIG,
                "resident": "resident.safetensors", "files": files}
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(manifest, f)
    assert open_checkpoint(root).experts.read(0, 1).down.shape == (8, 4) and verify_split(root) == []
    return root, manifest


HOSTILE_PATHS = ["/etc/passwd", "../secret", "secret_link", "zero_link", "fifo", "experts", "", "a\0b", "x" * 5000,
                 "resident.safetensors", split_shard_path(0, 0), "experts/../resident.safetensors"]
path_values = st.sampled_from(HOSTILE_PATHS) | json_values
file_entries = st.fixed_dictionaries({}, optional={"size": st.integers(-1, 1 << 20) | json_values,
                                                   "bytes": st.integers(0, 100), "sha256": st.text(max_size=64)})


@st.composite
def manifests(draw, pristine: dict) -> dict:
    m = json.loads(json.dumps(pristine))
    for key in draw(st.lists(st.sampled_from(["resident", "config", "files", "format", "source_format",
                                              "expert_encoding"]), max_size=3, unique=True)):
        if draw(st.booleans()):
            m.pop(key, None)
        elif key == "resident":
            m[key] = draw(path_values)
        elif key == "config":
            m[key] = {**CONFIG, **draw(st.dictionaries(st.sampled_from(list(CONFIG) + ["rope_scaling", "eos_token_id",
                                                                                    "mlp_only_layers"]),
                                                        json_values, max_size=3))}
        elif key == "files":
            extra = draw(st.dictionaries(path_values.filter(lambda p: isinstance(p, str)),
                                         file_entries | json_values, max_size=3))
            m[key] = {**m["files"], **extra} if draw(st.booleans()) else extra
        else:
            m[key] = draw(json_values | st.sampled_from(["gguf", "bf16-12bit", "moepage-split"]))
    return m


@settings(max_examples=100, deadline=timedelta(seconds=3), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_split_manifests(workdir, pristine_split, data):
    src, manifest = pristine_split
    root = os.path.join(fresh_dir(workdir), "model")
    shutil.copytree(src, root)
    os.symlink(os.path.join(os.path.dirname(src), "secret"), os.path.join(root, "secret_link"))
    os.symlink("/dev/zero", os.path.join(root, "zero_link"))
    os.mkfifo(os.path.join(root, "fifo"))
    m = data.draw(manifests(manifest))
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(m, f)
    ckpt = run_reader(root, open_checkpoint, root)
    if ckpt is not None:
        for e in range(2):
            run_reader(root, ckpt.experts.read, 0, e, allowed=(ExpertReadError,))
    problems = run_reader(root, verify_split, root, allowed=())
    assert isinstance(problems, list) and all(isinstance(p, str) and "fuzz-secret" not in p for p in problems)
