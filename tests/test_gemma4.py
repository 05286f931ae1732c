"""Gemma 4 MoE served from the published multimodal layout (the vision tower never read): fp32 logits of a prompt
longer than the sliding window within 1e-4 of transformers, bf16 greedy tokens equal to transformers.generate, the
same tokens at expert budgets of 100%, 25% and the minimum and from a `moepage split` directory, the sliding layers'
state bounded by the window and counted so, hostile configs refused naming the key, and a chat over HTTP through the
checkpoint's own chat template."""
from __future__ import annotations

import functools
import json

import httpx
import pytest
import torch

from family_support import check_budgets, check_chunked_prefill_and_reuse, edited_config_dir, greedy
from gemma4_support import gemma_tokenizer, load_reference, save_gemma4
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)
from moepage.engine.attention.sliding import WindowState
from moepage.engine.checkpoint import open_checkpoint
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.model_args import ConfigError
from moepage.engine.sequence_state import sequence_nbytes, state_nbytes
from server_support import MODEL_ID, serving


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("gemma4")
    tok = root / "tokenizer"
    gemma_tokenizer(tokenizer_dir, tok)
    return functools.cache(lambda dtype=torch.float32: save_gemma4(root / str(dtype)[6:], tok, dtype=dtype))


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_published_layout_reads_the_text_model_only(checkpoints):
    path = checkpoints()
    ckpt = open_checkpoint(str(path))
    names = set(ckpt.resident_checkpoint_names().values())
    assert all(n.startswith("model.language_model.") for n in names)
    assert ckpt.index.has("model.vision_tower.patch_embedder.input_proj.weight")  # there, never named
    a = ckpt.args
    assert a.mixers == ["gemma4_sliding_attention"] * 5 + ["gemma4_full_attention"]
    assert a.attention_kinds["gemma4_full_attention"] | {} == {
        "head_dim": 32, "kv_heads": 1, "k_eq_v": True, "rope_theta": 1e6, "rope_fraction": 0.25, "rope_factor": 1.0}
    assert "model.language_model.layers.5.self_attn.v_proj.weight" not in names  # k = v on the full layers


def test_fp32_logits_match_transformers(checkpoints):
    path = checkpoints()
    ids = prompt(64)  # the sliding window is 8: most positions see only part of the prompt
    with torch.no_grad():
        want = load_reference(path)(input_ids=torch.tensor([ids])).logits[0]
    engine = Engine.load(EngineConfig(str(path), ctx_size=128, threads=1))
    got = engine.model.forward(torch.tensor(ids), engine.model.new_state(128), 0, all_logits=True)
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, f"max abs logit diff {diff}"
    # one token at a time (the decode path, the sliding state carried) gives the same logits
    state = engine.model.new_state(128)
    steps = torch.cat([engine.model.forward(torch.tensor([t]), state, i) for i, t in enumerate(ids)])
    assert (steps - want).abs().max().item() < 1e-4
    engine.close()


def test_bf16_greedy_matches_transformers(checkpoints):
    path = checkpoints(torch.bfloat16)
    ids = prompt(24, seed=2)
    ref = load_reference(path, torch.bfloat16)
    want = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                        eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    engine = Engine.load(EngineConfig(str(path), threads=1))
    assert greedy(engine, ids) == want
    engine.close()


def test_budgets_and_a_split_directory_give_identical_tokens(tmp_path, checkpoints):
    from moepage.surgery.split import split_checkpoint, verify_split

    path = checkpoints(torch.bfloat16)
    ids = prompt(40, seed=3)
    engine = Engine.load(EngineConfig(str(path), threads=1, preload=False))
    full = greedy(engine, ids)
    a, each = engine.args, engine.plan.expert_bytes_each
    engine.close()
    assert open_checkpoint(str(path)).experts.stored_nbytes(0) == 3 * 64 * 32 * 2  # gate, up, down in bf16
    out = tmp_path / "split"
    split_checkpoint(str(path), str(out))
    assert verify_split(str(out)) == []
    check_budgets([path, out], ids, full, each, a, threads=1)


def test_sliding_layers_keep_and_count_only_the_window(checkpoints):
    engine = Engine.load(EngineConfig(str(checkpoints(torch.bfloat16)), ctx_size=256, threads=1))
    a = engine.args
    state = engine.model.new_state(256)
    engine.model.forward(torch.tensor(prompt(100)), state, 0)
    windows = [s for s in state.per_layer if isinstance(s, WindowState)]
    assert len(windows) == 5 and all(w.k.shape == (1, 2, 7, 16) for w in windows)
    sliding, full = 2 * 2 * 16 * 2, 2 * 1 * 32 * 2  # k and v per position, bf16: 2 kv heads x 16, 1 x 32
    assert state_nbytes(a, 256, torch.bfloat16) == 5 * 7 * sliding + 256 * full
    # the plan also holds the windows' copy at the newest chunk end (they cannot be rewound)
    assert engine.plan.kv_bytes == sequence_nbytes(a, 256, torch.bfloat16) == \
        state_nbytes(a, 256, torch.bfloat16) + 5 * 7 * sliding
    engine.close()


def test_prefill_in_chunks_and_prompt_reuse_give_the_same_tokens(checkpoints):
    """fp32 (chunks of another row count sum bf16 products in another order: in this tiny model's sharp scale-1
    attention that last bit can turn a token; in fp32 chunked and whole prefill agree within 2e-6)."""
    check_chunked_prefill_and_reuse(checkpoints(), prompt(30, seed=4), threads=1)  # sliding states restored


@pytest.mark.parametrize("change, match", [
    ({"enable_moe_block": False}, "enable_moe_block"),
    ({"hidden_size_per_layer_input": 256}, "hidden_size_per_layer_input"),
    ({"num_kv_shared_layers": 2}, "num_kv_shared_layers"),
    ({"layer_types": ["sliding_attention", "linear_attention"] * 3}, "layer_types"),
    ({"top_k_experts": None}, "top_k_experts"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6},
                          "sliding_attention": {"rope_theta": 1e4}}}, "rope_type"),
    ({"per_layer_config": {"5": {"head_dim": 1 << 40}}}, "head_dim"),
])
def test_hostile_configs_are_refused_naming_the_key(tmp_path, checkpoints, change, match):
    d = edited_config_dir(checkpoints(), tmp_path / "m", lambda config: config["text_config"].update(change))
    with pytest.raises(ConfigError, match=match):
        open_checkpoint(str(d))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_over_http_with_the_checkpoints_template(checkpoints, stream):
    from transformers import AutoTokenizer

    path = checkpoints(torch.bfloat16)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    rendered = AutoTokenizer.from_pretrained(str(path)).apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True)
    assert rendered.endswith("<|turn>model\n<|channel>thought\n<channel|>")  # Gemma 4's turns, thinking off
    engine = Engine.load(EngineConfig(str(path), ctx_size=512, threads=1))
    assert engine.tokenizer.render_chat(messages) == rendered
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    with serving(engine) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if not stream:
            usage = r.json()["usage"]
        else:
            assert r.text.rstrip().endswith("data: [DONE]")
            chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            usage = next(c["usage"] for c in chunks if c.get("usage"))
        assert usage["prompt_tokens"] == len(engine.tokenizer.encode(rendered, add_special_tokens=False))
    engine.close()
