"""One C++ call per decode token for a resident bf16 model (kernels/bf16_token.py, csrc/bf16_token.h) against the
per-layer fused path it replaces (one attention_decode and one experts_one_token call per layer): hidden state,
KV writes and logits bit for bit, the cache's hits counted, and the per-layer path taken under a cap, after an
eviction and with a routing observer. tests/test_portable_kernels.py runs this file with the AVX2 build too."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_checkpoint, prompt_ids, save_random_checkpoint
from moepage.engine.attention.gqa import QK_NORM_MODE
from moepage.engine.engine import Engine, EngineConfig
from moepage.kernels import cpu_bf16
from moepage.kernels.bf16_token import Bf16DecodeKernel
from qwen35_support import one_torch_thread  # noqa: F401  (fixture)

pytestmark = [pytest.mark.skipif(not cpu_bf16.available(), reason="the bf16 C++ kernels need a C++ compiler"),
              pytest.mark.usefixtures("one_torch_thread")]
N_TOKENS = 10
FAMILIES = ("qwen3_moe", "olmoe")


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory, tokenizer_dir):
    """qwen3_moe: per-head q/k norm, top-k renormalised, every layer sparse (the plan takes no dense layer), 4 experts
    of 8 a token; olmoe: q/k norm over all heads, not renormalised."""
    from transformers import Qwen3MoeConfig

    info = json.loads((tokenizer_dir / "info.json").read_text())
    qwen3 = Qwen3MoeConfig(vocab_size=info["vocab_size"], hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=4,
                           moe_intermediate_size=32, intermediate_size=96, max_position_embeddings=512,
                           eos_token_id=info["eos_token_id"], bos_token_id=None, pad_token_id=None,
                           tie_word_embeddings=False, norm_topk_prob=True)
    return {"qwen3_moe": save_random_checkpoint(qwen3, tmp_path_factory.mktemp("qwen3"), tokenizer_dir, 4,
                                                torch.bfloat16),
            "olmoe": make_checkpoint(tmp_path_factory.mktemp("olmoe"), "olmoe", tokenizer_dir, torch.bfloat16, seed=4,
                                     clip_qkv=None)}


def decode_logits(engine: Engine, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens after ids, one forward per token, and the logits [n, V] that chose them."""
    kv = engine.model.new_kv_cache(len(ids) + n + 1)
    logits = engine.model.forward(torch.tensor(ids), kv)
    tokens, rows = [], []
    for _ in range(n):
        rows.append(logits[-1])
        tokens.append(int(logits[-1].argmax()))
        logits = engine.model.forward(torch.tensor(tokens[-1:]), kv)
    return tokens, torch.stack(rows)


def per_layer(kernel: Bf16DecodeKernel):
    """The per-layer fused path: decode_token declines."""
    kernel.decode_token = lambda *a: None


@pytest.mark.parametrize("family", FAMILIES)
def test_one_call_per_token_gives_the_per_layer_calls_bits(bf16_models, family):
    engine = Engine.load(EngineConfig(str(bf16_models[family]), tokenizer=False, ctx_size=96))
    try:
        m = engine.model
        kernel = m._decode_kernel
        assert isinstance(kernel, Bf16DecodeKernel)
        ids = prompt_ids(20, engine.args.vocab_size, seed=5)
        a, b = (m.new_kv_cache(len(ids) + 2) for _ in range(2))
        with torch.inference_mode():
            m.forward(torch.tensor(ids), a)
            m.forward(torch.tensor(ids), b)
            pos = len(ids)
            h = torch.nn.functional.embedding(torch.tensor([11]), m.embed)
            cos, sin = (t[0] for t in m.rope.get(pos, 1))
            got = kernel.token.decode(m, h, a, pos, cos, sin, QK_NORM_MODE[m.args.qk_norm], head=False)
            assert got is not None and kernel.token.plan is not None
            want = h
            for i, layer in enumerate(m.layers):
                want = m._decode_layer(layer, want, b[i], pos, cos, sin)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        for x, y in zip(a.kv.layer_k + a.kv.layer_v, b.kv.layer_k + b.kv.layer_v):
            assert torch.equal(x[:, : pos + 1], y[:, : pos + 1])
        hits = engine.cache.stats.hits
        whole_tokens, whole = decode_logits(engine, ids, N_TOKENS)
        assert engine.cache.stats.hits - hits >= N_TOKENS * m.args.top_k * len(m.layers)  # hits counted
        per_layer(kernel)
        layer_tokens, layers = decode_logits(engine, ids, N_TOKENS)
    finally:
        engine.close()
    assert whole_tokens == layer_tokens
    assert torch.equal(whole, layers)  # the same final norm and lm_head kernels: the logits' bits too


def test_a_dense_layer_takes_the_per_layer_path(checkpoints):
    engine = Engine.load(EngineConfig(str(checkpoints("qwen3_moe", "bfloat16")), tokenizer=False, ctx_size=64))
    try:
        assert any(layer.moe is None for layer in engine.model.layers)  # conftest's qwen3_moe: mlp_only_layers [1]
        tokens, _ = decode_logits(engine, prompt_ids(12, engine.args.vocab_size), 3)
        assert len(tokens) == 3 and engine.model._decode_kernel.token.refused
    finally:
        engine.close()


def test_one_call_steps_aside_under_a_cap_after_an_eviction_and_for_an_observer(bf16_models):
    path = str(bf16_models["qwen3_moe"])
    ids = prompt_ids(18, 300, seed=6)
    full = Engine.load(EngineConfig(path, tokenizer=False, ctx_size=96))
    try:
        want, want_logits = decode_logits(full, ids, 6)
        token = full.model._decode_kernel.token
        assert token.plan is not None
        seen = []
        full.model.moe_blocks[0].observers.append(lambda *a: seen.append(a))  # routing observed: per-layer path
        again, again_logits = decode_logits(full, ids, 6)
        assert seen and again == want and torch.equal(again_logits, want_logits)
        full.model.moe_blocks[0].observers.clear()
        full.cache.resize(full.cache.used_bytes // 2)  # evicts half the experts
        again, again_logits = decode_logits(full, ids, 6)
        assert token.plan is None and again == want and torch.equal(again_logits, want_logits)
    finally:
        full.close()
