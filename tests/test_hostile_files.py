"""Model files are untrusted (DESIGN invariant 5): every case here was reproduced against the readers before the
fix. Hostile files are written by each test, a few KB each; every open is bounded in time and traced memory."""
from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
import tracemalloc
from contextlib import contextmanager

import pytest
from safetensors.torch import load_file, save_file

from moepage.cli import main as cli_main
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.model_args import ConfigError
from moepage.paging.pread import CheckpointError, ExpertReadError
from moepage.surgery.split import split_checkpoint, verify_split

PEAK_BYTES = 16 << 20  # traced allocation allowed for refusing one hostile file
SECONDS = 10.0
PASSWD = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


@contextmanager
def bounded(peak: int = PEAK_BYTES, seconds: float = SECONDS):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert used < peak, f"peak traced allocation {used} bytes"
    assert time.perf_counter() - t0 < seconds


def refused(fn, *args, match: str, error=CheckpointError, secret: bytes | None = None):
    """fn(*args) raises `error` matching `match`, within the bounds, with a one-line message that quotes no secret."""
    with bounded():
        with pytest.raises(error, match=match) as info:
            fn(*args)
    message = str(info.value)
    assert "\n" not in message
    if secret is not None:
        assert secret[:6].decode() not in message and str(struct.unpack("<Q", secret[:8])[0]) not in message
    return message


def copy_model(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("qwen3_moe", "float32")


@pytest.fixture(scope="module")
def split_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "s"
    split_checkpoint(str(model), str(out))
    return out


@pytest.fixture
def split_copy(split_dir, tmp_path):
    dst = tmp_path / "split"
    shutil.copytree(split_dir, dst)
    return dst


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DELETE:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


DELETE = object()


# ---- GGUF headers --------------------------------------------------------------------------------------------
def gstr(s: str | bytes, length: int | None = None) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf(kv: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0, version: int = 3,
         size: int = 4096) -> bytes:
    body = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kv + tensors
    return body + bytes(max(0, size - len(body)))


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", 4, value)


def tensor(name: str, dims: list[int], kind: int = 0, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, offset)


HOSTILE_GGUF = {
    "array of 2^63 elements": (gguf(gstr("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 1 << 63), 1),
                               "length of array 'tokenizer.ggml.scores' exceeds the limit"),
    "array of 2^40 strings": (gguf(gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 40), 1),
                              "length of array 'tokenizer.ggml.tokens' exceeds the limit"),
    "tensor count 2^64-1": (gguf(n_tensors=(1 << 64) - 1), "tensor count"),
    "key count 2^40": (gguf(n_kv=1 << 40), "metadata key count"),
    "key length 2^62": (gguf(gstr("k", 1 << 62), 1), "metadata key"),
    "string length 2^62": (gguf(gstr("general.name") + struct.pack("<I", 8) + gstr("x", 1 << 62), 1),
                           "string value of 'general.name'"),
    "nested array": (gguf(gstr("a") + struct.pack("<IIQ", 9, 9, 1), 1), "arrays of arrays"),
    "unknown value type": (gguf(gstr("a") + struct.pack("<I", 77), 1), "unknown value type 77"),
    "2^31 dimensions": (gguf(tensors=gstr("t") + struct.pack("<I", 1 << 31), n_tensors=1), "2147483648 dimensions"),
    "negative dimension": (gguf(tensors=tensor("t", [4, (1 << 64) - 4]), n_tensors=1), "negative dimension"),
    "tensor past the end": (gguf(tensors=tensor("t", [1 << 20, 1 << 20]), n_tensors=1), "'t': truncated"),
    "huge dims": (gguf(tensors=tensor("t", [1 << 62, 1 << 62, 1 << 62, 1 << 62]), n_tensors=1), "'t': truncated"),
    "offset past the end": (gguf(tensors=tensor("t", [8], offset=1 << 60), n_tensors=1), "'t': truncated"),
    "unaligned offset": (gguf(tensors=tensor("t", [8], offset=4), n_tensors=1), "not a multiple of the alignment"),
    "alignment 0": (gguf(kv_u32("general.alignment", 0), 1), "general.alignment"),
    "alignment 3": (gguf(kv_u32("general.alignment", 3), 1), "general.alignment"),
    "unknown GGML type": (gguf(tensors=tensor("t", [8], kind=99), n_tensors=1), "unknown GGML type id 99 in tensor 't'"),
    "partial block": (gguf(tensors=tensor("t", [33, 2], kind=8), n_tensors=1), "not whole Q8_0 blocks"),
    "version 4": (gguf(version=4), "unsupported GGUF version 4"),
    "version 1": (gguf(version=1), "unsupported GGUF version 1"),
    "big-endian": (gguf(version=3 << 24), "big-endian"),
    "duplicate key": (gguf(kv_u32("a", 1) + kv_u32("a", 2), 2), "'a' appears twice"),
}


@pytest.mark.parametrize("case", list(HOSTILE_GGUF))
def test_hostile_gguf_header_is_refused_naming_the_file(case, tmp_path):
    data, match = HOSTILE_GGUF[case]
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    message = refused(open_checkpoint, str(path), match=match)
    assert message.startswith(str(path))


def test_inspect_of_a_4kb_gguf_with_a_2_63_array_is_one_line(tmp_path, capsys):
    """It drove `moepage inspect` to 11.2 GB before a MemoryError (gguf-py's GGUFReader sized the array)."""
    path = tmp_path / "m.gguf"
    path.write_bytes(HOSTILE_GGUF["array of 2^63 elements"][0])
    with bounded():
        assert cli_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "m.gguf" in err[0] and "tokenizer.ggml.scores" in err[0]


def test_gguf_expert_tensor_of_another_shape_than_the_metadata_says_is_refused_at_load(tmp_path):
    from test_gguf_reader import E, H, I, tiny_qwen3moe, write_gguf

    _, tensors = tiny_qwen3moe(tmp_path / "ok.gguf")
    meta = {"qwen3moe.block_count": 2, "qwen3moe.embedding_length": H, "qwen3moe.attention.head_count": 4,
            "qwen3moe.attention.head_count_kv": 2, "qwen3moe.attention.key_length": 64, "qwen3moe.expert_count": E,
            "qwen3moe.expert_used_count": 2, "qwen3moe.expert_feed_forward_length": I // 2}
    path = write_gguf(tmp_path / "bad.gguf", "qwen3moe", tensors, meta)
    refused(open_checkpoint, path, match=rf"layer 0 experts gate: tensor 'blk\.0\.ffn_gate_exps\.weight' has shape "
                                         rf"\[{E}, {I}, {H}\], the config implies \[{E}, {I // 2}, {H}\]")


# ---- config.json ---------------------------------------------------------------------------------------------
CONFIGS = {
    "layers 1e9": ({"num_hidden_layers": 1e9}, "num_hidden_layers is 1000000000, outside 1..1024"),
    "heads 0": ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    "hidden as a string": ({"hidden_size": "256"}, "hidden_size must be an integer, not str"),
    "top-k above experts": ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 must be between 1 and the number of "
                                                        r"experts \(8\)"),
    "sparse step 0": ({"decoder_sparse_step": 0}, "decoder_sparse_step is 0"),
    "rope parameters a list": ({"rope_parameters": [1, 2]}, "rope_parameters must be an object"),
    "rope theta a string": ({"rope_parameters": {"rope_theta": "1e6"}}, "rope_theta must be a number"),
    "eos a string": ({"eos_token_id": "x"}, "eos_token_id"),
    "model type a list": ({"model_type": ["qwen3_moe"]}, "model_type: unsupported architecture"),
    "vocab missing": ({"vocab_size": DELETE}, "vocab_size is missing"),
    "kv heads not dividing": ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_is_one_line_naming_file_and_field(case, model, tmp_path):
    d = copy_model(model, tmp_path / "m")
    changes, match = CONFIGS[case]
    edit_json(d / "config.json", **changes)
    message = refused(open_checkpoint, str(d), match=match, error=ConfigError)
    assert message.startswith(str(d / "config.json"))


def test_generation_config_with_a_bad_eos_is_one_line(model, tmp_path):
    d = copy_model(model, tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 1.5}))
    refused(open_checkpoint, str(d), match="generation_config.json: eos_token_id must be a token id")


def test_config_that_is_a_list_and_inspect_of_1e9_layers(model, tmp_path, capsys):
    d = copy_model(model, tmp_path / "m")
    (d / "config.json").write_text("[1, 2]")
    refused(open_checkpoint, str(d), match="config.json: the config must be a JSON object, not list")
    config = json.loads((model / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1e9}))
    with bounded():  # 7.8 GB before: a list of 1e9 layer flags
        assert cli_main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and "num_hidden_layers" in err[0]


def rewrite_tensor(path, name, fn):
    tensors = load_file(str(path))
    tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_vocab_that_does_not_match_the_embedding_is_refused_with_both_shapes(model, tmp_path):
    d = copy_model(model, tmp_path / "m")
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    edit_json(d / "config.json", vocab_size=vocab + 8)
    refused(open_checkpoint, str(d),
            match=rf"'model\.embed_tokens\.weight' has shape \[{vocab}, 64\], the config implies \[{vocab + 8}, 64\]")


def test_transposed_tensors_are_refused_naming_tensor_and_shapes(model, tmp_path):
    d = copy_model(model, tmp_path / "m")
    rewrite_tensor(d / "model.safetensors", "model.layers.2.self_attn.k_proj.weight", lambda t: t.T)
    refused(open_checkpoint, str(d), match=r"'model\.layers\.2\.self_attn\.k_proj\.weight' has shape \[64, 32\], "
                                           r"the config implies \[32, 64\]")
    d2 = copy_model(model, tmp_path / "m2")
    rewrite_tensor(d2 / "model.safetensors", "model.layers.0.mlp.experts.5.down_proj.weight", lambda t: t.T)
    refused(open_checkpoint, str(d2), match=r"layer 0 expert 5 down: tensor 'model\.layers\.0\.mlp\.experts\.5\."
                                            r"down_proj\.weight' has shape \[32, 64\], the config implies \[64, 32\]")


def test_garbage_tokenizer_json_names_the_file(model, tmp_path):
    d = copy_model(model, tmp_path / "m")
    (d / "tokenizer.json").write_bytes(b'{"model": {"type": "secret-value"}}')
    ckpt = open_checkpoint(str(d))
    message = refused(ckpt.load_tokenizer, match="tokenizer.json: not a valid tokenizer.json")
    assert "secret-value" not in message


def test_tokenizer_files_linked_out_of_the_model_or_not_regular_are_refused(model, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_bytes(PASSWD)
    d = copy_model(model, tmp_path / "m")
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer_config.json").symlink_to(outside)
    refused(open_checkpoint(str(d)).load_tokenizer, match="outside the model directory", secret=PASSWD)
    (d / "tokenizer_config.json").unlink()
    os.mkfifo(d / "tokenizer_config.json")  # opening a fifo would wait forever for a writer
    refused(open_checkpoint(str(d)).load_tokenizer, match="tokenizer_config.json is not a regular file")
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer_config.json").write_text("[1, 2]")
    refused(open_checkpoint(str(d)).load_tokenizer, match="tokenizer_config.json must be a JSON object")
    (d / "tokenizer_config.json").write_text('{"chat_template": 7}')
    refused(open_checkpoint(str(d)).load_tokenizer, match="chat_template must be a string")


# ---- safetensors headers -------------------------------------------------------------------------------------
def safetensors_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("header,match", [
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, r"'w': data at byte \d+ is not aligned"),
    ({"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, "'w': negative dimension"),
    ({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}, "'w': data_offsets lie outside"),
    ({"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, "'w': shape and data_offsets must be integers"),
    ({"w": "secret-value"}, "'w' has a malformed header entry"),
    ({"__metadata__": {"a": 1}}, "__metadata__ is not a map of strings"),
])
def test_malformed_safetensors_entries_name_file_and_tensor(header, match, tmp_path):
    from moepage.paging.safetensors_file import SafetensorsFile

    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(64)))
    message = refused(SafetensorsFile, str(path), match=match)
    assert message.startswith(str(path)) and "secret-value" not in message


def test_absurd_header_length_is_not_echoed(tmp_path):
    """/etc/passwd read as a safetensors file printed `declared length 3475222254926655346` (b"root:x:0")."""
    from moepage.paging.safetensors_file import SafetensorsFile

    path = tmp_path / "passwd.safetensors"
    path.write_bytes(PASSWD)
    refused(SafetensorsFile, str(path), match="declared header length exceeds the file", secret=PASSWD)


# ---- paths named in a model directory ------------------------------------------------------------------------
@pytest.fixture
def outside(tmp_path):
    d = tmp_path / "outside"
    d.mkdir()
    (d / "passwd").write_bytes(PASSWD)
    return d


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_split_resident_outside_the_directory_is_refused(where, split_copy, outside):
    """resident "/abs/x.safetensors" or "../../etc/passwd" loaded silently from outside the directory."""
    stolen = outside / "resident.safetensors"
    shutil.copyfile(split_copy / "resident.safetensors", stolen)
    if where == "absolute":
        edit_json(split_copy / "moepage.json", resident=str(stolen))
    elif where == "dotdot":
        edit_json(split_copy / "moepage.json", resident="../outside/passwd")
    else:
        os.remove(split_copy / "resident.safetensors")
        os.symlink(outside / "passwd", split_copy / "resident.safetensors")
    refused(open_checkpoint, str(split_copy), match="inside the model directory|outside the model directory",
            secret=PASSWD)


def test_symlink_inside_the_directory_is_followed(split_copy):
    os.rename(split_copy / "resident.safetensors", split_copy / "weights.bin")
    os.symlink("weights.bin", split_copy / "resident.safetensors")
    assert open_checkpoint(str(split_copy)).kind == "split"


@pytest.mark.parametrize("entry", ["absolute", "dotdot", "symlink"])
def test_index_weight_map_outside_the_directory_is_refused(entry, model, tmp_path, outside):
    d = copy_model(model, tmp_path / "m")
    shutil.copyfile(d / "model.safetensors", outside / "model.safetensors")
    names = list(load_file(str(d / "model.safetensors")))
    target = {"absolute": str(outside / "model.safetensors"), "dotdot": "../outside/model.safetensors",
              "symlink": "link.safetensors"}[entry]
    if entry == "symlink":
        os.symlink(outside / "model.safetensors", d / "link.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))
    refused(open_checkpoint, str(d), match="inside the model directory|outside the model directory")


def test_split_does_not_copy_a_file_linked_from_outside(model, tmp_path, outside):
    d = copy_model(model, tmp_path / "m")
    os.symlink(outside / "passwd", d / "chat_template.jinja")
    refused(split_checkpoint, str(d), str(tmp_path / "out"), match="chat_template.jinja: model file resolves to .*, "
                                                                  "outside the model directory", secret=PASSWD)
    assert not (tmp_path / "out" / "chat_template.jinja").exists()


def test_huggingface_cache_snapshot_links_into_its_blobs(model, tmp_path):
    repo = tmp_path / "models--org--name"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in model.iterdir():
        shutil.copyfile(f, blobs / f"blob-{f.name}")
        os.symlink(f"../../blobs/blob-{f.name}", snap / f.name)
    assert open_checkpoint(str(snap)).kind == "hf"


def test_verify_checks_resident_and_every_path(split_copy, outside):
    """verify printed OK for resident=/etc/passwd and hashed files outside the directory."""
    edit_json(split_copy / "moepage.json", resident=str(outside / "passwd"))
    assert any("resident must name a file listed under files" in p for p in verify_split(str(split_copy)))
    manifest = json.loads((split_copy / "moepage.json").read_text())
    manifest["resident"] = "resident.safetensors"
    manifest["files"][str(outside / "passwd")] = {"size": len(PASSWD), "sha256": "0" * 64}
    (split_copy / "moepage.json").write_text(json.dumps(manifest))
    problems = verify_split(str(split_copy))
    assert len(problems) == 1 and "must be a path inside the model directory" in problems[0]


def run_bounded(fn, *args, seconds: float = SECONDS):
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"{fn.__name__} did not return within {seconds} s"
    return out[0]


def test_verify_of_dev_zero_and_a_fifo_returns(split_copy):
    """`moepage verify` on a manifest listing /dev/zero never returned."""
    os.symlink("/dev/zero", split_copy / "zero")
    os.mkfifo(split_copy / "fifo")
    manifest = json.loads((split_copy / "moepage.json").read_text())
    for name in ("/dev/zero", "zero", "fifo"):
        manifest["files"][name] = {"size": 0, "sha256": "0" * 64}
    (split_copy / "moepage.json").write_text(json.dumps(manifest))
    problems = run_bounded(verify_split, str(split_copy))
    assert len(problems) == 3
    assert sum("/dev/zero: file listed in moepage.json must be a path inside" in p for p in problems) == 1
    assert sum("zero: file listed in moepage.json resolves to /dev/zero, outside" in p for p in problems) == 1
    assert sum("fifo: file listed in moepage.json is not a regular file" in p for p in problems) == 1


def test_manifest_without_config_or_sizes(split_copy, capsys):
    edit_json(split_copy / "moepage.json", config=DELETE)
    refused(open_checkpoint, str(split_copy), match="moepage.json: config is missing")
    assert cli_main(["inspect", str(split_copy)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    manifest = json.loads((split_copy / "moepage.json").read_text())
    manifest["config"] = {}
    del manifest["files"]["resident.safetensors"]["size"]
    (split_copy / "moepage.json").write_text(json.dumps(manifest))
    assert any("files['resident.safetensors'].size is missing" in p for p in verify_split(str(split_copy)))
    refused(open_checkpoint, str(split_copy), match=r"files\['resident.safetensors'\].size is missing")
    (split_copy / "moepage.json").write_text("[]")
    refused(open_checkpoint, str(split_copy), match="not a moepage split manifest")


# ---- while serving: a changed, truncated, deleted or unreadable expert ---------------------------------------
def flip_in_place(path, at: int):
    """One byte flipped without changing the file's size or inode; its mtime moved on so the change shows."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_shard_overwritten_while_serving_is_refused(split_copy):
    """It was re-parsed but not re-hashed: the output was silently garbage."""
    experts = open_checkpoint(str(split_copy)).experts
    experts.read(0, 3)
    shard = split_copy / "experts" / "L000" / "E0003.safetensors"
    flip_in_place(shard, os.path.getsize(shard) - 5)
    with pytest.raises(ExpertReadError, match=r"E0003\.safetensors: changed since it was loaded \(layer 0 expert 3\); "
                                              r"restart the server or run `moepage verify`"):
        experts.read(0, 3)


def test_original_checkpoint_changed_while_serving_is_refused(model, tmp_path):
    d = copy_model(model, tmp_path / "m")
    ckpt = open_checkpoint(str(d))
    ckpt.experts.read(0, 1)
    info = ckpt.index.info("model.layers.0.mlp.experts.1.up_proj.weight", "test")
    flip_in_place(d / "model.safetensors", info.start)
    with pytest.raises(ExpertReadError, match=r"model\.safetensors: changed since it was loaded \(layer 0 expert 1\)"):
        ckpt.experts.read(0, 1)


def test_embedding_rows_read_from_a_changed_file_are_refused(model, tmp_path):
    import torch

    d = copy_model(model, tmp_path / "m")
    ckpt = open_checkpoint(str(d))
    rows = ckpt.tensor_rows("model.embed_tokens.weight", torch.float32, "cpu")
    assert rows(torch.tensor([1, 2])).shape == (2, 64)
    flip_in_place(d / "model.safetensors", rows.start + rows.row_bytes)
    with pytest.raises(ExpertReadError, match=r"model\.safetensors: changed since it was loaded \(rows of "
                                              r"model\.embed_tokens\.weight\)"):
        rows(torch.tensor([1, 2]))


def test_gguf_embedding_rows_read_from_a_changed_file_are_refused(tmp_path):
    import torch
    from test_gguf_reader import tiny_qwen3moe

    path, _ = tiny_qwen3moe(tmp_path / "m.gguf")
    ckpt = open_checkpoint(path)
    rows = ckpt.tensor_rows("token_embd.weight", torch.float32, "cpu")
    assert rows(torch.tensor([1, 2])).shape == (2, rows.cols)
    flip_in_place(path, rows.start + rows.row_bytes)
    with pytest.raises(ExpertReadError, match=r"m\.gguf: changed since it was loaded \(rows of token_embd\.weight\)"):
        rows(torch.tensor([1, 2]))


def test_gguf_changed_while_serving_is_refused(tmp_path):
    from test_gguf_reader import tiny_qwen3moe

    path, _ = tiny_qwen3moe(tmp_path / "m.gguf")
    ckpt = open_checkpoint(path)
    ckpt.experts.read_quantized(1, 2)
    flip_in_place(path, ckpt.gguf.info("blk.1.ffn_up_exps.weight").start)
    with pytest.raises(ExpertReadError, match=r"m\.gguf: changed since it was loaded \(layer 1 expert 2\)"):
        ckpt.experts.read_quantized(1, 2)


@pytest.mark.parametrize("damage", ["truncated", "deleted", "garbage", "fifo", "unreadable"])
def test_every_page_in_failure_is_an_expert_read_error(damage, split_copy):
    experts = open_checkpoint(str(split_copy), verify=False).experts
    shard = split_copy / "experts" / "L002" / "E0002.safetensors"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "deleted":
        os.remove(shard)
    elif damage == "garbage":
        shard.write_bytes(PASSWD)
    elif damage == "fifo":
        os.remove(shard)
        os.mkfifo(shard)
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        shard.chmod(0)
    message = run_bounded(_read_error, experts, 2, 2)
    assert "E0002.safetensors" in message and "layer 2 expert 2" in message and "root:x" not in message


def _read_error(experts, layer, expert) -> str:
    try:
        experts.read(layer, expert)
    except ExpertReadError as e:
        return str(e)
    raise AssertionError("the read did not fail")


def test_engine_page_in_of_a_changed_shard_raises_expert_read_error(split_copy):
    from moepage.engine.engine import Engine, EngineConfig

    engine = Engine.load(EngineConfig(str(split_copy), preload=False, tokenizer=False))
    try:
        engine.cache.acquire((0, 4))
        engine.cache.release((0, 4))
        engine.cache.resize(0)  # evicts it: the next acquire reads the shard again
        flip_in_place(split_copy / "experts" / "L000" / "E0004.safetensors", 200)
        engine.cache.resize(1 << 30)
        with pytest.raises(ExpertReadError, match="changed since it was loaded"):
            engine.cache.acquire((0, 4))
    finally:
        engine.close()
