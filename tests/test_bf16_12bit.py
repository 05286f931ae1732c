"""The lossless 12-bit bf16 encoding: every bit pattern survives, corrupt parts are refused, and a `split --lossless`
directory serves the same tokens as the checkpoint it came from while reading a quarter fewer expert bytes."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import prompt_ids
from moepage.cli import main as cli_main
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.kernels import native
from moepage.engine.sampling import SamplingParams
from moepage.kernels.cpu_bf16 import linear
from moepage.paging.bf16_12bit import (EncodingError, Packed, PackedMatrix, fused_kernel, pack, unpack_into,
                                       unpack_torch)
from moepage.paging.pread import ExpertReadError, aligned_bytes
from moepage.paging.safetensors_file import CheckpointError
from moepage.paging.sources import sha256_of
from moepage.surgery.split import split_checkpoint, verify_split
from test_paging import expert_bytes, run

NATIVE = native.load("bf16_unpack") is not None


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def decoders():
    return [unpack_into, unpack_torch]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 700), spread=st.sampled_from([0.02, 1.0, 1e-30]), wild=st.floats(0, 0.3),
       seed=st.integers(0, 2**31 - 1))
def test_roundtrip_is_bit_exact(n, spread, wild, seed):
    """Normal weights (few high bytes) mixed with arbitrary bit patterns (NaN, inf, -0, subnormals: escapes)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=g) * spread).to(torch.bfloat16)
    anything = torch.randint(-(2**15), 2**15, (n,), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    t = torch.where(torch.rand(n, generator=g) < wild, anything, t)
    p = pack(t)
    assert p.nbytes == n + -(-n // 64) * 32 + p.exc.numel() + 16
    for decode in decoders():
        out = decode(p, torch.empty(n, dtype=torch.bfloat16))
        assert torch.equal(bits(out), bits(t)), decode.__name__


def test_weights_take_three_quarters_of_the_bytes():
    t = (torch.randn(384, 1024) * 0.02).to(torch.bfloat16)
    p = pack(t)
    assert p.exc.numel() < t.numel() // 1000  # normal weights: almost no escapes
    assert p.nbytes / (t.numel() * 2) < 0.751
    out = unpack_into(p, torch.empty(384, 1024, dtype=torch.bfloat16))
    assert torch.equal(bits(out), bits(t))


@pytest.mark.skipif(not NATIVE, reason="the C++ decoder did not build (no compiler)")
def test_native_decoder_matches_torch_on_every_block_position():
    for n in (1, 63, 64, 65, 127, 128, 4096 + 17):
        t = torch.randint(-(2**15), 2**15, (n,), dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        p = pack(t)
        a = native.load("bf16_unpack")
        out = torch.empty(n, dtype=torch.bfloat16)
        a.unpack_bf16(p.lo, p.codes, p.exc, p.lut, out)
        assert torch.equal(bits(out), bits(unpack_torch(p, torch.empty(n, dtype=torch.bfloat16))))


@pytest.mark.parametrize("decode", decoders())
def test_corrupt_parts_are_refused(decode):
    t = torch.randint(-(2**15), 2**15, (200,), dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    p = pack(t)
    assert p.exc.numel() > 0
    out = torch.empty(200, dtype=torch.bfloat16)
    with pytest.raises(EncodingError, match="escape bytes"):
        decode(Packed(p.lo, p.codes, p.exc[:-1], p.lut), out)
    with pytest.raises(EncodingError, match="escape bytes"):
        decode(Packed(p.lo, p.codes, torch.cat([p.exc, p.exc[:1]]), p.lut), out)
    with pytest.raises(EncodingError, match="'codes' has 64 bytes, 128 expected"):
        decode(Packed(p.lo, p.codes[:64], p.exc, p.lut), out)
    with pytest.raises(EncodingError, match="'lo' has 199 bytes"):
        decode(Packed(p.lo[:199], p.codes, p.exc, p.lut), out)
    with pytest.raises(EncodingError, match="'lut' is torch.int8"):
        decode(Packed(p.lo, p.codes, p.exc, p.lut.to(torch.int8)), out)
    with pytest.raises(EncodingError, match="encodes bf16 tensors"):
        pack(torch.zeros(4))


def test_lossless_split_serves_identical_tokens_with_fewer_bytes(checkpoints, tmp_path):
    src = checkpoints("qwen3_moe", "bfloat16")
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    split_checkpoint(str(src), str(plain))
    assert cli_main(["split", str(src), str(packed), "--lossless"]) == 0
    manifest = json.loads((packed / "moepage.json").read_text())
    assert manifest["expert_encoding"] == "bf16-12bit"
    assert verify_split(str(packed)) == []
    want, _, engine = run(src)
    tokens, _, _ = run(packed, expert_bytes(engine) * 2)  # a tiny cache: most steps page in
    assert tokens == want
    # without prefetch both read exactly the experts the tokens miss
    tokens, stats, _ = run(packed, expert_bytes(engine) * 2, prefetch=False)
    _, plain_stats, _ = run(plain, expert_bytes(engine) * 2, prefetch=False)
    assert tokens == want
    assert plain_stats["misses"] == stats["misses"] > 0
    ratio = stats["bytes_read"] / plain_stats["bytes_read"]
    assert 0.70 < ratio < 0.80, ratio  # 12 of 16 bits plus the file's alignment and tables
    for layer, e in ((0, 0), (2, 5)):  # the decoded weights are the checkpoint's, bit for bit
        a, b = engine_read(src, layer, e), engine_read(packed, layer, e)
        for part in ("gate", "up", "down"):
            assert torch.equal(bits(getattr(a, part)), bits(getattr(b, part)))


@pytest.fixture(scope="module")
def bf16_splits(checkpoints, tmp_path_factory):
    """(the bf16 checkpoint, its plain split, its lossless split, a budget under which most experts page in)."""
    src = checkpoints("qwen3_moe", "bfloat16")
    root = tmp_path_factory.mktemp("bf16-splits")
    plain, packed = root / "plain", root / "packed"
    split_checkpoint(str(src), str(plain))
    split_checkpoint(str(src), str(packed), lossless=True)
    probe = Engine.load(EngineConfig(str(packed), memory_budget=1 << 30, ctx_size=64, tokenizer=False))
    budget = probe.plan.min_budget + 2 * probe.plan.expert_bytes_each  # read buffers and two experts' room
    probe.close()
    return src, plain, packed, budget


@pytest.mark.parametrize("io_threads", [0, 2])
def test_read_buffers_of_encoded_shards_count_in_the_budget(bf16_splits, monkeypatch, io_threads):
    """Each page-in thread (and the generating thread) keeps a buffer an encoded shard is read into: the plan takes
    them out of the budget before the expert cache, at least as many bytes as the threads really allocate while
    paging, and a budget that cannot hold them as well is refused."""
    import threading

    from moepage.paging import sources

    _, plain, packed, budget = bf16_splits
    cfg = dict(io_threads=io_threads, tokenizer=False, ctx_size=64)
    staged = []
    monkeypatch.setattr(sources, "_staging", threading.local())  # no thread holds a buffer yet
    monkeypatch.setattr(sources, "aligned_bytes", lambda n: staged.append(n) or aligned_bytes(n))
    engine = Engine.load(EngineConfig(str(packed), memory_budget=budget, **cfg))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    list(engine.generate(prompt_ids(12, engine.args.vocab_size), params))
    engine.close()
    plan = engine.plan
    assert engine.cache.stats.misses > 0 and staged
    assert sum(staged) <= plan.buffer_bytes, (staged, plan.buffer_bytes)
    assert plan.resident_bytes + plan.kv_bytes + plan.buffer_bytes + plan.expert_cache_bytes <= budget
    assert "read buffers" in plan.summary()
    plain_engine = Engine.load(EngineConfig(str(plain), memory_budget=budget, **cfg))
    assert plain_engine.plan.buffer_bytes == 0
    plain_engine.close()
    with pytest.raises(ValueError, match="read buffers"):
        Engine.load(EngineConfig(str(packed), memory_budget=plan.min_budget - 1, **cfg))


def test_start_up_suggests_lossless_shards_only_where_bf16_experts_page_in(bf16_splits, capsys):
    src, _, packed, budget = bf16_splits
    gen = ["generate", "--prompt-ids", "1,2,3", "--max-tokens", "2", "--ctx-size", "64"]
    small = ["--memory-budget", str(budget)]
    capsys.readouterr()
    assert cli_main(gen + ["--model", str(src), *small]) == 0
    hint = f"`moepage split {src} OUT --lossless`" in capsys.readouterr().err
    assert hint == native.runs_here("bf16_unpack")  # torch's decoder costs more than the bytes it saves
    for model, budget_args in ((packed, small), (src, [])):
        assert cli_main(gen + ["--model", str(model), *budget_args]) == 0
        assert "--lossless" not in capsys.readouterr().err


def engine_read(path, layer, e):
    return open_checkpoint(str(path)).experts.read(layer, e)


def test_lossless_split_refuses_float32_and_reports_a_corrupt_shard(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="--lossless encodes bf16 experts"):
        split_checkpoint(str(checkpoints("qwen3_moe", "float32")), str(tmp_path / "f32"), lossless=True)
    assert not (tmp_path / "f32").exists()  # refused before anything was written
    out = tmp_path / "packed"
    split_checkpoint(str(checkpoints("qwen3_moe", "bfloat16")), str(out), lossless=True)
    manifest = json.loads((out / "moepage.json").read_text())
    shard = out / "experts" / "L000" / "E0002.safetensors"
    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
    parts = load_file(str(shard))
    name = next(k for k in parts if k.endswith("gate_proj.weight.lo"))
    parts[name] = parts[name][:-1]  # one low byte short, hashes updated: only the decoder can tell
    save_file(parts, str(shard), metadata=meta)
    manifest["files"]["experts/L000/E0002.safetensors"]["sha256"] = sha256_of(str(shard))
    manifest["files"]["experts/L000/E0002.safetensors"]["size"] = shard.stat().st_size
    (out / "moepage.json").write_text(json.dumps(manifest))
    engine = Engine.load(EngineConfig(str(out), preload=False))
    with pytest.raises(ExpertReadError, match=r"E0002\.safetensors: layer 0 expert 2 gate: shape \[\d+, \d+\] does not match its \d+ low"):
        engine.cache.acquire((0, 2))
    engine.close()
    shard = out / "experts" / "L000" / "E0004.safetensors"
    with safe_open(str(shard), "pt") as f:
        meta, parts = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    gate = next(n for n in json.loads(meta["shapes"]) if "gate_proj" in n)
    broken = {"{broken": "malformed 'shapes' metadata", json.dumps({gate: [-2, -3]}): "malformed 'shapes' metadata",
              json.dumps({**json.loads(meta["shapes"]), gate: [999, 999]}): r"gate: .* shape \[999, 999\], the config implies"}
    for shapes, message in broken.items():  # the manifest's hashes updated: only the reader can tell
        save_file(parts, str(shard), metadata={**meta, "shapes": shapes})
        manifest["files"]["experts/L000/E0004.safetensors"].update(sha256=sha256_of(str(shard)),
                                                                   size=shard.stat().st_size)
        (out / "moepage.json").write_text(json.dumps(manifest))
        engine = Engine.load(EngineConfig(str(out), preload=False))
        with pytest.raises(ExpertReadError, match=rf"E0004\.safetensors: layer 0 expert 4.*{message}"):
            engine.cache.acquire((0, 4))
        engine.close()
    exc = f"{gate}.exc"  # one escape byte too many: the decoder's own check, reported with the file
    save_file({**parts, exc: torch.cat([parts[exc], torch.zeros(1, dtype=torch.uint8)])}, str(shard), metadata=meta)
    manifest["files"]["experts/L000/E0004.safetensors"].update(sha256=sha256_of(str(shard)), size=shard.stat().st_size)
    (out / "moepage.json").write_text(json.dumps(manifest))
    engine = Engine.load(EngineConfig(str(out), preload=False))
    with pytest.raises(ExpertReadError, match=r"E0004\.safetensors: layer 0 expert 4 gate: .*escape bytes"):
        engine.cache.acquire((0, 4))
    engine.close()
    manifest["expert_encoding"] = "bf16-9bit"
    (out / "moepage.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unknown expert encoding 'bf16-9bit'"):
        Engine.load(EngineConfig(str(out)))


@pytest.mark.parametrize("rows", [1, 64, 100])
def test_packed_matrix_products_are_the_bf16_matrix_products(rows, monkeypatch):
    """Blocks of `rows` rows, each with its own table; normal weights with arbitrary bit patterns mixed in (finite:
    a NaN in a product row makes two results incomparable)."""
    monkeypatch.setattr(PackedMatrix, "ROWS", rows)
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(300, 128, generator=g) * 0.02).to(torch.bfloat16)
    anything = torch.randint(-(2**15), 2**15, w.shape, generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    w = torch.where((torch.rand(w.shape, generator=g) < 0.01) & anything.float().abs().lt(1e3), anything, w)
    m = PackedMatrix.of(w)
    if rows > 1:  # (one-row blocks: every row's 15 most common high bytes cover its few odd values)
        assert m.exc.numel() > 0 and m.nbytes < w.numel() * 2 * 0.8
    for i in range(m.luts.shape[0]):
        assert torch.equal(bits(m.block(i)), bits(w[i * rows : (i + 1) * rows]))
    for M in (1, 3, 20):  # the fused kernel, the few-rows kernel, torch's GEMM
        x = torch.randn(M, 128, generator=g).to(torch.bfloat16)
        assert torch.equal(bits(m.linear(x, linear)), bits(linear(x, w))), M
    with pytest.raises(EncodingError, match="multiple of 64 columns"):
        PackedMatrix.of(w[:, :100].contiguous())


def test_engine_packed_lm_head_gives_the_same_logits_in_less_memory(checkpoints):
    path = checkpoints("qwen3_moe", "bfloat16")
    engines = {flag: Engine.load(EngineConfig(str(path), pack_lm_head=flag)) for flag in (False, None)}
    plain, packed = engines[False], engines[None]
    assert isinstance(packed.model.lm_head, PackedMatrix) == (fused_kernel() is not None)
    ids = torch.tensor(prompt_ids(40, plain.args.vocab_size, seed=5))
    a = plain.model.forward(ids, plain.model.new_kv_cache(64), start=0, all_logits=True)
    b = packed.model.forward(ids, packed.model.new_kv_cache(64), start=0, all_logits=True)
    assert torch.equal(bits(a), bits(b))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert ([s.token for s in plain.generate(ids.tolist(), params)]
            == [s.token for s in packed.generate(ids.tolist(), params)])
    if fused_kernel() is not None:
        assert packed.plan.resident_bytes < plain.plan.resident_bytes
    for e in engines.values():
        e.close()
