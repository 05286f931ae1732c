"""An FP8 variant of the tiny glm4_moe written as the published FP8 checkpoints store it (tests/fp8_support.py)
against transformers' own FP8 loader, which dequantizes it: fp32 logits within 1e-4, bf16 greedy tokens equal to
transformers.generate at 100%, 25% and the minimum expert budget, experts held and counted as FP8 bytes, resident
FP8 weights dequantized once at load; configs and tensors moepage does not read refused, naming what."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import prompt_ids
from fp8_support import dequantized_reference, write_fp8_checkpoint
from glm4_support import save_glm4_moe, stored_dtypes
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.fp8_expert import Fp8Expert
from moepage.engine.sampling import SamplingParams
from moepage.paging.safetensors_file import CheckpointError
from moepage.surgery.split import split_checkpoint
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)

BLOCK = (32, 32)  # several blocks per tiny matrix (the published 128 x 128 would be one)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory, tokenizer_dir):
    made = {}

    def get(dtype: str):
        if dtype not in made:
            root = tmp_path_factory.mktemp(f"fp8-{dtype}")
            hf = save_glm4_moe(root / "hf", tokenizer_dir, dtype=getattr(torch, dtype))
            made[dtype] = write_fp8_checkpoint(hf, root / "fp8", BLOCK)
        return made[dtype]

    return get


def greedy(engine, ids, n=32):
    return [s.token for s in engine.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))]


def test_published_layout(fp8_checkpoint):
    dtypes = stored_dtypes(fp8_checkpoint("float32"))
    assert dtypes["model.layers.1.mlp.experts.0.down_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"] == "F32"
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.1.mlp.gate.weight"] == "F32" and dtypes["lm_head.weight"] == "F32"


def test_fp32_logits_match_transformers_dequantized(fp8_checkpoint):
    path = fp8_checkpoint("float32")
    engine = Engine.load(EngineConfig(path, tokenizer=False))
    a = engine.args
    ids = prompt_ids(64, a.vocab_size)
    ours = engine.logits_all(ids)
    with torch.no_grad():
        ref = dequantized_reference(path)(torch.tensor([ids])).logits[0]
    assert (ours.float() - ref.float()).abs().max().item() < 1e-4
    # the budget counts FP8 bytes: one byte a weight and the float32 scales of 32 x 32 blocks
    H, I = a.hidden_size, a.moe_intermediate_size
    assert engine.plan.expert_bytes_each == 3 * H * I + 3 * 4 * (H // 32) * (I // 32)
    assert isinstance(engine.cache.load(1, 0), Fp8Expert)
    engine.close()


def test_bf16_greedy_at_every_budget_and_from_a_split(fp8_checkpoint, tmp_path):
    path = fp8_checkpoint("bfloat16")
    ids = prompt_ids(24, 400, seed=2)
    full = Engine.load(EngineConfig(path, tokenizer=False))
    want = greedy(full, ids)
    a, each = full.args, full.plan.expert_bytes_each
    assert isinstance(full.cache.load(1, 0), Fp8Expert)
    full.close()
    out = dequantized_reference(path, torch.bfloat16).generate(
        torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert want == out[0, len(ids):].tolist()
    total = each * len(a.moe_layers) * a.num_experts
    split = str(tmp_path / "split")
    split_checkpoint(path, split)
    shard = stored_dtypes(tmp_path / "split" / "experts" / "L001")  # E0000..E0007.safetensors: FP8 as stored
    assert shard["model.layers.1.mlp.experts.0.up_proj.weight"] == "F8_E4M3"
    assert shard["model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"] == "F32"
    for where in (path, split):
        for label, budget in (("25%", total // 4), ("minimum", a.top_k * each)):
            engine = Engine.load(EngineConfig(where, expert_cache_bytes=budget, preload=False, tokenizer=False))
            assert greedy(engine, ids) == want, (where, label)
            assert engine.cache.stats.snapshot()["evictions"] > 0
            assert isinstance(engine.cache.load(2, 1), Fp8Expert)
            engine.close()
    with pytest.raises(ValueError, match="FP8"):
        split_checkpoint(path, str(tmp_path / "lossless"), lossless=True)


def copy_with(src, dst, config_change=None, tensor_change=None):
    """A copy of checkpoint src whose config (a dict -> None function) or one shard's tensors were changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config_change:
        config = json.loads((dst / "config.json").read_text())
        config_change(config)
        (dst / "config.json").write_text(json.dumps(config))
    if tensor_change:
        name, fn = tensor_change
        index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
        shard = dst / index[name]
        tensors = load_file(str(shard))
        tensors[name] = fn(tensors[name])
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("change, match", [
    (lambda c: c["quantization_config"].update(weight_block_size=[0, 128]), "weight_block_size"),
    (lambda c: c["quantization_config"].update(weight_block_size=128), "weight_block_size"),
    (lambda c: c["quantization_config"].update(fmt="e5m2"), "fmt"),
    (lambda c: c["quantization_config"].update(activation_scheme="static"), "activation_scheme"),
])
def test_hostile_quantization_config_refused(fp8_checkpoint, tmp_path, change, match):
    bad = copy_with(__import__("pathlib").Path(fp8_checkpoint("float32")), tmp_path / "bad", config_change=change)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(bad)


@pytest.mark.parametrize("name, fn, match", [
    ("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv", lambda t: t[:, :1].contiguous(), "scale"),
    ("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv", lambda t: t.bfloat16(), "float32"),
    ("model.layers.2.mlp.experts.5.down_proj.weight", lambda t: t.float(), "float8_e4m3fn"),
])
def test_bad_expert_tensors_refused_at_load(fp8_checkpoint, tmp_path, name, fn, match):
    bad = copy_with(__import__("pathlib").Path(fp8_checkpoint("float32")), tmp_path / "bad", tensor_change=(name, fn))
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(bad)


def test_deepseek_v3_fp8_reads_the_same_way(tmp_path, tokenizer_dir):
    """Family-agnostic: an FP8 DeepSeek-V3 (MLA projections FP8 too; 8 x 8 blocks divide every one of its tiny
    matrices, as transformers' loader needs) against transformers' dequantized model, paged at the minimum."""
    from mla_support import save_mla

    hf = save_mla("deepseek_v3", tmp_path / "hf", tokenizer_dir)
    path = write_fp8_checkpoint(hf, tmp_path / "fp8", (8, 8))
    assert stored_dtypes(path)["model.layers.0.self_attn.kv_b_proj.weight"] == "F8_E4M3"
    engine = Engine.load(EngineConfig(path, tokenizer=False))
    ids = prompt_ids(32, engine.args.vocab_size)
    ours = engine.logits_all(ids)
    a, each = engine.args, engine.plan.expert_bytes_each
    engine.close()
    with torch.no_grad():
        ref = dequantized_reference(path)(torch.tensor([ids])).logits[0]
    assert (ours.float() - ref.float()).abs().max().item() < 1e-4
    paged = Engine.load(EngineConfig(path, expert_cache_bytes=a.top_k * each, preload=False, tokenizer=False))
    assert torch.equal(paged.logits_all(ids), ours)
    paged.close()


def test_inspect_counts_experts_as_fp8(fp8_checkpoint):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "moepage.cli", "inspect", fp8_checkpoint("float32")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(s for s in out.stdout.splitlines() if s.startswith("bytes per expert"))
    assert "as stored (FP8 + block scales)" in line and "6.0 KiB in memory" in line  # 3 x 32 x 64 + 6 scales x 4


def test_served_over_http_under_a_memory_budget(fp8_checkpoint):
    import httpx

    from server_support import load_engine, serving

    engine = load_engine(fp8_checkpoint("bfloat16"), memory_budget=64 << 20)
    ids = prompt_ids(12, 400, seed=6)
    want = greedy(engine, ids, 8)
    with serving(engine) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": "hardening-test", "prompt": ids, "max_tokens": 8,
                                                         "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(want)
    engine.close()
