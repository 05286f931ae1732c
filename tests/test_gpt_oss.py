"""gpt-oss served from the published layout, float and MXFP4 (kept MXFP4): fp32 logits of a prompt longer than the
sliding window within 1e-4 of transformers (MXFP4: of transformers on the dequantized experts), bf16 greedy tokens
equal to transformers.generate, the same tokens at expert budgets of 100%, 25% and the minimum, the sliding layers'
state bounded by the window and counted so, hostile configs refused, and a Harmony chat over HTTP."""
from __future__ import annotations

import functools

import httpx
import pytest
import torch

from family_support import check_budgets, check_chunked_prefill_and_reuse, edited_config_dir, greedy
from gpt_oss_support import reference, save_gpt_oss
from gpt_oss_support import one_torch_thread  # noqa: F401 (autouse: one thread here)
from moepage.engine.attention.sliding import WindowState
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.model_args import ConfigError
from moepage.engine.sequence_state import sequence_nbytes, state_nbytes
from server_support import MODEL_ID, serving

KINDS = ("float", "mxfp4")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    return functools.cache(lambda kind, dtype=torch.float32: save_gpt_oss(
        root / f"{kind}_{str(dtype)[6:]}", dtype=dtype, mxfp4_experts=kind == "mxfp4"))


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_logits_match_transformers(checkpoints, kind):
    path = checkpoints(kind)
    ids = prompt(64)  # the sliding window is 8: most positions see only part of the prompt
    with torch.no_grad():
        want = reference(path)(torch.tensor([ids])).logits[0]
    engine = Engine.load(EngineConfig(str(path), ctx_size=128, threads=1))
    assert engine.args.mixers == ["sliding_attention", "full_attention"] * 2
    got = engine.model.forward(torch.tensor(ids), engine.model.new_state(128), 0, all_logits=True)
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, f"{kind}: max abs logit diff {diff}"
    engine.close()


def reference_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[bool]]:
    """transformers' greedy tokens and, per step, whether its top two logits lie within two bf16 steps of each
    other (a near-tie that a last-bit difference in a sum may turn)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ties = []
    for scores in out.scores:
        top = scores[0].float().topk(2).values
        ties.append(bool(top[0] - top[1] <= 2 * 2.0 ** (torch.frexp(top[0]).exponent.item() - 8)))
    return out.sequences[0, len(ids):].tolist(), ties


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_greedy_matches_transformers(checkpoints, kind):
    """Float experts: the same ops on the same bf16 tensors, so all 32 tokens are equal, near-ties included. MXFP4:
    the fp32 dot runs in another order than torch's bf16 matmul of the dequantized experts, so the tokens are equal
    up to the reference's first near-tie (at least 8 of them)."""
    path = checkpoints(kind, torch.bfloat16)
    ids = prompt(24, seed=2 if kind == "float" else 10)
    want, ties = reference_greedy(reference(path, torch.bfloat16), ids, 32)
    engine = Engine.load(EngineConfig(str(path), threads=1))
    got = greedy(engine, ids)
    engine.close()
    if kind == "float":
        assert got == want
    else:
        upto = ties.index(True) + 1 if True in ties else 32  # the tie step itself may go either way
        assert upto >= 8 and got[: upto - 1] == want[: upto - 1]


@pytest.mark.parametrize("kind", KINDS)
def test_budgets_give_identical_tokens(checkpoints, kind):
    path = checkpoints(kind, torch.bfloat16)
    ids = prompt(40, seed=3)
    engine = Engine.load(EngineConfig(str(path), threads=1, preload=False))
    full = greedy(engine, ids)
    each = engine.plan.expert_bytes_each
    engine.close()
    src = open_checkpoint(str(path)).experts
    assert each == src.stored_nbytes(0)  # a bf16 file computed in bf16: what is stored is what is held
    check_budgets([path], ids, full, each, engine.args, threads=1)


def test_mxfp4_experts_cost_their_mxfp4_bytes(checkpoints):
    f, m = (open_checkpoint(str(checkpoints(k, torch.bfloat16))).experts for k in KINDS)
    H, I = 64, 64
    biases = (2 * I + H) * 2
    assert m.stored_nbytes(0) == 3 * H * I * 17 // 32 + biases  # 4.25 bits a weight, bf16 biases
    assert f.stored_nbytes(0) == 3 * H * I * 2 + biases
    engine = Engine.load(EngineConfig(str(checkpoints("mxfp4", torch.bfloat16)), threads=1))
    assert engine.plan.expert_bytes_each == m.stored_nbytes(0)
    engine.close()


def test_sliding_layers_keep_and_count_only_the_window(checkpoints):
    engine = Engine.load(EngineConfig(str(checkpoints("float", torch.bfloat16)), ctx_size=256, threads=1))
    a = engine.args
    state = engine.model.new_state(256)
    engine.model.forward(torch.tensor(prompt(100)), state, 0)
    windows = [s for s in state.per_layer if isinstance(s, WindowState)]
    assert len(windows) == 2 and all(w.k.shape[2] == a.sliding_attention_window - 1 for w in windows)
    per_position = 2 * a.num_kv_heads * a.head_dim * 2  # k and v, bf16
    full_layers, sliding_layers = 2, 2
    assert state_nbytes(a, 256, torch.bfloat16) == per_position * (full_layers * 256 + sliding_layers * 7)
    # the plan also holds the windows' copy at the newest chunk end (they cannot be rewound)
    assert engine.plan.kv_bytes == sequence_nbytes(a, 256, torch.bfloat16) == \
        state_nbytes(a, 256, torch.bfloat16) + per_position * sliding_layers * 7
    assert sum(w.nbytes for w in windows) == per_position * sliding_layers * 7
    engine.close()


def test_prefill_in_chunks_and_prompt_reuse_give_the_same_tokens(checkpoints):
    check_chunked_prefill_and_reuse(checkpoints("float", torch.bfloat16), prompt(30, seed=4), threads=1)


@pytest.mark.parametrize("change, match", [
    ({"quantization_config": {"quant_method": "fp8"}}, "quant_method"),
    ({"layer_types": ["sliding_attention", "linear_attention", "full_attention", "full_attention"]}, "layer_types"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"num_local_experts": None}, "num_local_experts"),
])
def test_hostile_configs_are_refused_naming_the_key(tmp_path, checkpoints, change, match):
    d = edited_config_dir(checkpoints("float"), tmp_path / "m", lambda config: config.update(change))
    with pytest.raises(ConfigError, match=match):
        open_checkpoint(str(d))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_over_http_with_the_harmony_template(checkpoints, stream):
    engine = Engine.load(EngineConfig(str(checkpoints("mxfp4", torch.bfloat16)), ctx_size=512, threads=1))
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
            "temperature": 0, "reasoning_effort": "high", "stream": stream}
    with serving(engine) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if not stream:
            out = r.json()
            assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["finish_reason"] == "length"
        else:
            assert r.text.rstrip().endswith("data: [DONE]")
    engine.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_split_directory_gives_the_same_tokens_and_bytes(tmp_path, checkpoints, kind):
    from moepage.surgery.split import split_checkpoint, verify_split

    path = checkpoints(kind, torch.bfloat16)
    out = tmp_path / "split"
    split_checkpoint(str(path), str(out))
    assert verify_split(str(out)) == []
    src, split = open_checkpoint(str(path)).experts, open_checkpoint(str(out)).experts
    assert split.stored_nbytes(0) == src.stored_nbytes(0) and split.is_mxfp4(0) == (kind == "mxfp4")
    ids = prompt(40, seed=5)
    engine = Engine.load(EngineConfig(str(path), threads=1, preload=False))
    want, each = greedy(engine, ids), engine.plan.expert_bytes_each
    engine.close()
    for budget in (None, engine.args.top_k * each):
        e = Engine.load(EngineConfig(str(out), threads=1, preload=False, expert_cache_bytes=budget))
        assert e.plan.expert_bytes_each == each and greedy(e, ids) == want
        e.close()
    shard = out / "experts" / "L001" / "E0002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    e = Engine.load(EngineConfig(str(out), threads=1, preload=False))
    with pytest.raises(Exception, match="sha256 mismatch for layer 1 expert 2"):
        e.cache.acquire((1, 2))
    e.close()


def test_lossless_split_and_gguf_export_refuse_the_fused_layout_before_writing(tmp_path, checkpoints):
    from moepage.surgery.gguf_export import GGUFExportError, write_gguf
    from moepage.surgery.split import split_checkpoint

    src = str(checkpoints("mxfp4"))
    with pytest.raises(ValueError, match="fused per layer"):
        split_checkpoint(src, str(tmp_path / "split"), lossless=True)
    assert not (tmp_path / "split").exists()
    with pytest.raises(GGUFExportError, match="convert_hf_to_gguf"):
        write_gguf(src, str(tmp_path / "out.gguf"))
    assert not (tmp_path / "out.gguf").exists()
