"""Each family against transformers: fp32 logits within 1e-4, bf16 greedy tokens identical."""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, prompt_ids, reference_model
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
