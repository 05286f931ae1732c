"""DeepSeek-V3, DeepSeek-V2 and GLM-4.7-Flash (multi-head latent attention) against transformers on tiny random
checkpoints with more than one expert group (V3, GLM: a non-zero e_score_correction_bias; V2: group-limited greedy
softmax routing), a dense first layer, shared experts and YaRN with mscale (V3, V2): fp32 logits within 1e-4,
bf16 greedy tokens equal to transformers.generate (up to a
near-tie of its logits), the same tokens at 100%/25%/minimum expert budgets from split and
split --lossless directories."""
from __future__ import annotations

import functools

import pytest
import torch

from conftest import prompt_ids
from family_support import check_budgets_from_split_dirs, check_greedy_until_a_near_tie, greedy_of, reference_greedy_margins
from mla_support import save_mla
from moepage.engine.engine import Engine, EngineConfig
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)

FAMILIES = ("deepseek_v3", "deepseek_v2", "glm4_moe_lite")
PROMPT_SEED = {"deepseek_v3": 2, "deepseek_v2": 2, "glm4_moe_lite": 6}  # prompts without a bf16 near-tie (docs/mla-notes.md)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return functools.cache(lambda family, dtype: save_mla(family, tmp_path_factory.mktemp(f"{family}-{dtype}"),
                                                          tokenizer_dir, dtype=getattr(torch, dtype)))


def reference(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_match_transformers(checkpoint, family):
    path = checkpoint(family, "float32")
    engine = Engine.load(EngineConfig(str(path), tokenizer=False))
    a = engine.args
    assert a.sparse_layers == [False, True, True] and a.mixers == ["mla"] * 3
    assert engine.model.moe_blocks[0].gate.config.n_group > 1
    if family != "deepseek_v2":
        assert engine.model.moe_blocks[0].gate.correction_bias.abs().min() > 0
    ids = prompt_ids(64, a.vocab_size)
    ours = engine.logits_all(ids)
    with torch.no_grad():
        ref = reference(path)(torch.tensor([ids])).logits[0]
    assert (ours.float() - ref.float()).abs().max().item() < 1e-4
    # decode (the absorbed form) continues the prefill (the expanded form): the next token's logits agree too
    state = engine.model.new_state(128)
    engine.model.forward(torch.tensor(ids[:-1]), state)
    step = engine.model.forward(torch.tensor(ids[-1:]), state)[0]
    assert (step - ref[-1]).abs().max().item() < 1e-4
    engine.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_greedy_and_budgets_from_split_dirs(checkpoint, tmp_path, family):
    src = checkpoint(family, "bfloat16")
    ids = prompt_ids(24, 400, seed=PROMPT_SEED[family])
    want = greedy_of(src, ids, tokenizer=False)
    check_greedy_until_a_near_tie(want, *reference_greedy_margins(src, ids, reference=reference))
    check_budgets_from_split_dirs(src, ids, want, tmp_path)
