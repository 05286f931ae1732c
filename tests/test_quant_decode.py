"""The fused quantized decode step (kernels/ggml_decode.py: one C++ call per layer for the attention half over ggml's
kernels, one for the routed experts) against the op-by-op path on the same GGUF file made by llama.cpp's tools."""
from __future__ import annotations

import pytest
import torch

from gguf_support import tiny_q4_k_m
from moepage.engine.engine import Engine, EngineConfig
from moepage.kernels.ggml_cpu import backend
from moepage.kernels.ggml_decode import QuantizedDecodeKernel

pytestmark = pytest.mark.skipif(backend() is None, reason="ggml's CPU library (libggml-python) or the C++ build is "
                                                          "unavailable here; moepage uses torch")
N_TOKENS = 12


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory, tokenizer_dir):
    """{family: path} of a tiny Q4_K_M GGUF per family (qwen2_moe has a shared expert: routing stays in Python)."""
    return tiny_q4_k_m(tmp_path_factory.mktemp("gguf-quant-decode"), tokenizer_dir)


def decode_logits(engine: Engine, ids: list[int], n: int, forced: list[int] | None = None) -> tuple[list[int],
                                                                                                   torch.Tensor]:
    """n greedy tokens after ids, one forward per token, and the logits [n, V] that chose them; with forced, those
    tokens are fed instead (teacher forcing: two paths' logits compared on the same inputs past a near-tie)."""
    kv = engine.model.new_kv_cache(len(ids) + n + 1)
    logits = engine.model.forward(torch.tensor(ids), kv)
    tokens, rows = [], []
    for i in range(n):
        rows.append(logits[-1].float())
        tokens.append(int(logits[-1].argmax()))
        logits = engine.model.forward(torch.tensor([forced[i] if forced else tokens[-1]]), kv)
    return tokens, torch.stack(rows)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_decode_equals_the_op_path(q4_k_m, family, dtype):
    engine = Engine.load(EngineConfig(q4_k_m[family], dtype=dtype, tokenizer=False, ctx_size=128))
    try:
        assert isinstance(engine.model._decode_kernel, QuantizedDecodeKernel)
        ids = list(range(5, 40))
        fused_tokens, fused = decode_logits(engine, ids, N_TOKENS)
        engine.model._decode_kernel = None  # the op-by-op path (torch SDPA, ggml matvecs one by one)
        op_tokens, op = decode_logits(engine, ids, N_TOKENS, forced=fused_tokens)
    finally:
        engine.close()
    steps = (fused - op).abs().max(-1).values  # [N_TOKENS], on the same (the fused path's) tokens
    scale = op.abs().max().item()
    if dtype == "float32":  # the same products in another summation order
        assert steps.max().item() <= 1e-4 * scale, f"max |fused - op| logit per step {steps.tolist()} (max {scale})"
        assert fused_tokens == op_tokens
        return
    # bfloat16: a few 1-ulp roundings apart per layer, so a router near-tie may pick another expert at one step (seen:
    # the tiny Qwen2-MoE's 10th token, 0.61 against 0.13-0.15 elsewhere); every other step stays within 5%
    over = steps > 0.05 * scale
    assert int(over.sum()) <= 1 and steps.max().item() <= 0.2 * scale, f"per-step max |fused - op| {steps.tolist()}"


def test_torch_threads_wait_passively_unless_the_user_says_otherwise():
    """moepage's import sets OMP_WAIT_POLICY=PASSIVE for libgomp (read when torch loads it); a user's value wins."""
    import os
    import subprocess
    import sys

    code = "import moepage, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,  # noqa: E731
                                   timeout=60).stdout.strip()
    assert run(env) == "PASSIVE"
    assert run({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def _prefilled(engine: Engine, ids: list[int], n: int):
    kv = engine.model.new_kv_cache(len(ids) + n + 1)
    engine.model.forward(torch.tensor(ids), kv)
    return kv


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_call_per_token_equals_the_per_layer_calls(q4_k_m, family, dtype):
    """kernels/ggml_token.py runs every layer of a resident Q4_K_M in one C++ call: its hidden state and KV writes
    are bit for bit those of one attention_decode + one experts_one_token call per layer (with Qwen2-MoE's shared
    expert and its sigmoid gate: SparseMoE's own ops), and its greedy tokens those of the per-layer path (the final
    norm's summation order may differ by an ulp)."""
    from moepage.engine.attention.gqa import QK_NORM_MODE

    engine = Engine.load(EngineConfig(q4_k_m[family], dtype=dtype, tokenizer=False, ctx_size=128))
    try:
        m = engine.model
        assert (m.layers[0].moe.shared is not None) == (family == "qwen2_moe")
        ids = list(range(7, 31))
        a, b = _prefilled(engine, ids, 4), _prefilled(engine, ids, 4)
        with torch.inference_mode():
            pos = len(ids)
            h = torch.nn.functional.embedding(torch.tensor([17]), m.embed)
            cos, sin = (t[0] for t in m.rope.get(pos, 1))
            got = m._decode_kernel.token.decode(m, h, a, pos, cos, sin, QK_NORM_MODE[m.args.qk_norm], head=False)
            assert got is not None and m._decode_kernel.token.plan is not None
            want = h
            for i, layer in enumerate(m.layers):
                want = m._decode_layer(layer, want, b[i], pos, cos, sin)
        assert got.dtype == want.dtype and torch.equal(got, want)
        for x, y in zip(a.kv.layer_k + a.kv.layer_v, b.kv.layer_k + b.kv.layer_v):
            assert torch.equal(x[:, : pos + 1], y[:, : pos + 1])
        whole_tokens, whole = decode_logits(engine, ids, N_TOKENS)
        hits = engine.cache.stats.hits
        m._decode_kernel.decode_token = lambda *a: None  # the per-layer fused path
        try:
            layer_tokens, per_layer = decode_logits(engine, ids, N_TOKENS)
        finally:
            del m._decode_kernel.decode_token
    finally:
        engine.close()
    assert hits >= N_TOKENS * m.args.top_k * len(m.layers)  # the one-call path counts its cache hits
    assert whole_tokens == layer_tokens
    scale = per_layer.abs().max().item()
    assert (whole - per_layer).abs().max().item() <= (1e-5 if dtype == "float32" else 0.02) * scale


def test_one_call_per_token_steps_aside_under_a_cap_and_after_an_eviction(q4_k_m):
    """Not every expert resident (a memory budget), or an eviction since the plan was built: the per-layer path
    runs, with the same tokens as the resident one-call path."""
    path = q4_k_m["qwen3_moe"]
    ids = list(range(9, 30))
    full = Engine.load(EngineConfig(path, tokenizer=False, ctx_size=128))
    try:
        want, _ = decode_logits(full, ids, 8)
        token = full.model._decode_kernel.token
        assert token.plan is not None
        full.cache.resize(full.cache.used_bytes // 2)  # evicts half the experts
        again, _ = decode_logits(full, ids, 8)
        assert token.plan is None and again == want
    finally:
        full.close()
