"""Each family against transformers: fp32 logits within 1e-4, bf16 greedy tokens identical."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_checkpoint, prompt_ids, reference_model
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.sampling import SamplingParams


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_match_transformers(family, checkpoints):
    path = checkpoints(family, "float32")
    engine = Engine.load(EngineConfig(str(path)))
    ids = prompt_ids(64, engine.args.vocab_size)
    ours = engine.logits_all(ids)
    with torch.no_grad():
        ref = reference_model(path)(torch.tensor([ids])).logits[0]
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff < 1e-4, f"{family}: max abs logit diff {diff}"
    engine.close()


def greedy_reference(path, ids, n, dtype):
    model = reference_model(path, dtype)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def greedy_ours(engine, ids, n):
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [s.token for s in engine.generate(ids, params)]


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_greedy_matches_transformers(family, checkpoints):
    path = checkpoints(family, "bfloat16")
    engine = Engine.load(EngineConfig(str(path)))
    ids = prompt_ids(24, engine.args.vocab_size, seed=2)
    assert greedy_ours(engine, ids, 32) == greedy_reference(path, ids, 32, torch.bfloat16)
    engine.close()


def greedy_with_margins(model, ids, n):
    """Greedy tokens through model.forward one token at a time, with each step's top-2 logit margin."""
    kv = model.new_kv_cache(len(ids) + n + 1)
    logits = model.forward(torch.tensor(ids), kv)[-1].float()
    tokens, margins = [], []
    for _ in range(n):
        top = logits.topk(2).values
        tokens.append(int(logits.argmax()))
        margins.append((top[0] - top[1]).item() / top[0].abs().item())
        logits = model.forward(torch.tensor([tokens[-1]]), kv)[-1].float()
    return tokens, margins


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_decode_layer_gives_the_tokens_of_the_op_by_op_path(family, tmp_path, tokenizer_dir):
    """The C++ attention-half kernel (with the routing it does for most families) against the torch ops it
    replaces: logits within a few bf16 steps, the same greedy tokens until a step whose top two logits are within
    bf16 rounding of each other. OLMoE without clip_qkv runs its full-width q/k norm through the kernel."""
    from moepage.kernels import cpu_bf16

    if not cpu_bf16.available():
        pytest.skip("the bf16 C++ kernels need AVX512-BF16 and a compiler")
    path = make_checkpoint(tmp_path, family, tokenizer_dir, torch.bfloat16, clip_qkv=None)
    engine = Engine.load(EngineConfig(str(path)))
    model, kernel = engine.model, engine.model._decode_kernel
    assert kernel is not None
    ids = prompt_ids(24, engine.args.vocab_size, seed=3)
    fused, _ = greedy_with_margins(model, ids, 32)
    assert greedy_ours(engine, ids, 32) == fused  # the engine's decode loop takes the fused path
    steps = {}
    for name, k in (("fused", kernel), ("ops", None)):
        model._decode_kernel = k
        kv = model.new_kv_cache(64)
        steps[name] = [model.forward(torch.tensor([t]), kv)[0].float() for t in ids[:12]]
    diff = max((a - b).abs().max().item() for a, b in zip(steps["fused"], steps["ops"]))
    assert diff < 0.05 * max(b.abs().max().item() for b in steps["ops"]), diff
    ops, margins = greedy_with_margins(model, ids, 32)
    first = next((i for i, (a, b) in enumerate(zip(fused, ops)) if a != b), None)
    assert first is None or margins[first] < 2**-6, (first, margins[first])  # diverged only at a near-tie
    engine.close()


def test_fused_decode_past_the_kv_cache_raises_the_same_error_as_the_op_path(checkpoints):
    from moepage.engine.kv_cache import ContextOverflow
    from moepage.kernels import cpu_bf16

    if not cpu_bf16.available():
        pytest.skip("the bf16 C++ kernels need AVX512-BF16 and a compiler")
    engine = Engine.load(EngineConfig(str(checkpoints("qwen3_moe", "bfloat16"))))
    model, kernel = engine.model, engine.model._decode_kernel
    assert kernel is not None
    messages = []
    for k in (kernel, None):
        model._decode_kernel = k
        kv = model.new_kv_cache(4)
        model.forward(torch.tensor([1, 2, 3, 4]), kv)
        with pytest.raises(ContextOverflow) as err:
            model.forward(torch.tensor([5]), kv)
        messages.append(str(err.value))
    assert messages[0] == messages[1] == "sequence of 5 tokens exceeds the KV cache of 4 tokens"
    engine.close()
