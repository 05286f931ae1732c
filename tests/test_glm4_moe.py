"""GLM-4.5-style glm4_moe (q/k norm, partial RoPE, qkv bias, sigmoid group-limited router with a non-zero float32
correction bias, a shared expert, a dense first layer) against transformers: fp32 logits within 1e-4, bf16 greedy
tokens equal to transformers.generate, the same tokens at every expert budget from split and split --lossless
directories, one HTTP request, hostile configs refused naming the key."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from conftest import prompt_ids
from glm4_support import save_glm4_moe, stored_dtypes
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.model_args import ConfigError
from moepage.engine.moe import PreparedExpert
from moepage.engine.router import Router
from moepage.engine.sampling import SamplingParams
from moepage.surgery.split import split_checkpoint
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    made = {}

    def get(dtype: str):
        if dtype not in made:
            made[dtype] = save_glm4_moe(tmp_path_factory.mktemp(f"glm-{dtype}"), tokenizer_dir,
                                        dtype=getattr(torch, dtype))
        return made[dtype]

    return get


def reference(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()


def greedy(engine, ids, n=32):
    return [s.token for s in engine.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))]


def test_fp32_logits_match_transformers(checkpoint):
    path = checkpoint("float32")
    engine = Engine.load(EngineConfig(str(path), tokenizer=False))
    a = engine.args
    assert a.sparse_layers == [False, True, True] and a.rotary_dim == 8 and a.shared_expert_intermediate_size == 32
    assert (a.routing.n_group, a.routing.topk_group, a.routing.routed_scaling_factor) == (4, 2, 2.5)
    bias = engine.model.layers[1].moe.gate.correction_bias
    assert bias is not None and bias.abs().min() > 0
    ids = prompt_ids(64, a.vocab_size)
    ours = engine.logits_all(ids)
    with torch.no_grad():
        ref = reference(path)(torch.tensor([ids])).logits[0]
    assert (ours.float() - ref.float()).abs().max().item() < 1e-4
    engine.close()


def test_correction_bias_changes_the_choice(checkpoint):
    """The bias steers routing in this fixture (else a loader that dropped it would pass the logits test)."""
    engine = Engine.load(EngineConfig(str(checkpoint("float32")), tokenizer=False))
    gate = engine.model.layers[1].moe.gate
    x = torch.randn(64, engine.args.hidden_size, generator=torch.Generator().manual_seed(3))
    _, with_bias = gate(x)
    _, without = Router(gate.weight, gate.config)(x)
    assert (with_bias.sort(-1).values != without.sort(-1).values).any()
    engine.close()


def test_bf16_greedy_and_budgets_from_split_dirs(checkpoint, tmp_path):
    src = checkpoint("bfloat16")
    dtypes = stored_dtypes(src)
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    ids = prompt_ids(24, 400, seed=2)
    full = Engine.load(EngineConfig(str(src), tokenizer=False))
    assert full.model.layers[1].moe.gate.correction_bias.dtype == torch.float32
    want = greedy(full, ids)
    a = full.args
    full.close()
    out = reference(src, torch.bfloat16).generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                                  do_sample=False, eos_token_id=None, pad_token_id=0)
    assert want == out[0, len(ids):].tolist()
    each = PreparedExpert.nbytes_for(a.hidden_size, a.moe_intermediate_size, torch.bfloat16)
    total = each * len(a.moe_layers) * a.num_experts
    for lossless in (False, True):
        d = tmp_path / f"split-{lossless}"
        split_checkpoint(str(src), str(d), lossless=lossless)
        for label, budget in (("100%", total), ("25%", total // 4), ("minimum", a.top_k * each)):
            engine = Engine.load(EngineConfig(str(d), expert_cache_bytes=budget, preload=False, tokenizer=False))
            assert greedy(engine, ids) == want, f"lossless={lossless} {label}"
            engine.close()


def test_serve_answers_over_http(checkpoint):
    from server_support import load_engine, serving

    engine = load_engine(str(checkpoint("bfloat16")))
    ids = prompt_ids(12, 400, seed=6)
    want = greedy(engine, ids, 8)
    with serving(engine) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": "hardening-test", "prompt": ids, "max_tokens": 8,
                                                         "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(want)
    engine.close()


@pytest.mark.parametrize("key, value", [("n_group", 3), ("topk_group", 5), ("first_k_dense_replace", 9),
                                        ("n_shared_experts", -1), ("routed_scaling_factor", "big"),
                                        ("mlp_layer_types", ["dense"])])
def test_hostile_config_is_refused_naming_the_key(checkpoint, tmp_path, key, value):
    src = checkpoint("float32")
    config = json.loads((src / "config.json").read_text())
    config[key] = value
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    for f in src.glob("*.safetensors*"):
        (d / f.name).symlink_to(f)
    with pytest.raises(ConfigError, match=key):
        open_checkpoint(str(d))
