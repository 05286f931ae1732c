"""The fused quantized decode step (kernels/ggml_decode.py: one C++ call per layer for the attention half over ggml's
kernels, one for the routed experts) against the op-by-op path on the same GGUF file made by llama.cpp's tools."""
from __future__ import annotations

import pytest
import torch

from gguf_support import convert, find_converter, llama_cpp_module, make_gguf_source, quantize
from moepage.engine.engine import Engine, EngineConfig
from moepage.kernels.ggml_cpu import backend
from moepage.kernels.ggml_decode import QuantizedDecodeKernel

pytestmark = pytest.mark.skipif(backend() is None, reason="ggml's CPU library (libggml-python) or the C++ build is "
                                                          "unavailable here; moepage uses torch")
N_TOKENS = 12


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory, tokenizer_dir):
    """{family: path} of a tiny Q4_K_M GGUF per family (qwen2_moe has a shared expert: routing stays in Python)."""
    llama_cpp_module()
    root = tmp_path_factory.mktemp("gguf-quant-decode")
    converter = find_converter(str(root))
    out = {}
    for family in ("qwen3_moe", "qwen2_moe"):
        hf = make_gguf_source(root / family, family, tokenizer_dir, seed=3)
        f16 = str(root / f"{family}-f16.gguf")
        convert(converter, [(hf, f16, "f16")])
        out[family] = quantize(f16, str(root / f"{family}-q4_k_m.gguf"), "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    return out


def decode_logits(engine: Engine, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens after ids, one forward per token, and the logits [n, V] that chose them."""
    kv = engine.model.new_kv_cache(len(ids) + n + 1)
    logits = engine.model.forward(torch.tensor(ids), kv)
    tokens, rows = [], []
    for _ in range(n):
        rows.append(logits[-1].float())
        tokens.append(int(logits[-1].argmax()))
        logits = engine.model.forward(torch.tensor(tokens[-1:]), kv)
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
        op_tokens, op = decode_logits(engine, ids, N_TOKENS)
    finally:
        engine.close()
    diff = (fused - op).abs().max().item()
    scale = op.abs().max().item()
    # float32: the same products in another summation order; bfloat16: a few 1-ulp roundings apart per layer
    assert diff <= (1e-4 if dtype == "float32" else 0.05) * scale, f"max |fused - op| logit {diff} (max {scale})"
    if dtype == "float32":
        assert fused_tokens == op_tokens


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
