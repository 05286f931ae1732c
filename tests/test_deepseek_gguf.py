"""DeepSeek-V2 and DeepSeek-V3 as GGUFs from llama.cpp's own converter (arch deepseek2: kv_b_proj split into k_b
and v_b, the gating function telling V3's sigmoid router from V2's softmax one, YaRN's mscale_all_dim as a log
multiplier), served with experts paged from the file: greedy tokens equal to llama.cpp's (llama-cpp-python 0.3.36)
up to the first router near-tie, the same at 25% of the experts and at the minimum.

The llama.cpp in llama-cpp-python reads attention.q_lora_rank for every deepseek2 model that does not have
DeepSeek-V2-Lite's 26/27 layers, so both tiny models here use a low-rank q."""
from __future__ import annotations

import json

import pytest

from gguf_support import check_gguf_against_llama_cpp, convert_one, find_converter, llama_cpp_module
from mla_support import save_mla
from moepage.engine.engine import Engine, EngineConfig
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)

VARIANTS = {
    # V2's greedy softmax router (llama.cpp's deepseek2 graph limits groups by the top-2 sum, V2's transformers
    # router by the group maximum: the V2 fixture keeps one group)
    "deepseek_v2": dict(q_lora_rank=24, n_group=1, topk_group=1, topk_method="greedy"),
    # the published V3 config.json names its score function; transformers' config does not keep it
    "deepseek_v3": dict(scoring_func="sigmoid"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir):
    llama_cpp_module()
    root = tmp_path_factory.mktemp("deepseek-gguf")
    converter = find_converter(str(root / "src"))
    info = json.loads((tokenizer_dir / "info.json").read_text())
    made = {}

    def get(family):
        if family not in made:
            hf = save_mla(family, root / f"{family}-hf", tokenizer_dir, vocab_size=info["vocab_size"],
                          eos=info["eos_token_id"], **VARIANTS[family])
            made[family] = hf, convert_one(converter, hf, root / f"{family}-f16.gguf")  # deepseek2 skips MTP itself
        return made[family]

    return get


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_gguf_reads_the_latent_attention(converted, family):
    _, path = converted(family)
    engine = Engine.load(EngineConfig(path, dtype="float32", tokenizer=False))
    a = engine.args
    assert a.family == family and a.mixers == ["mla"] * 3 and a.sparse_layers == [False, True, True]
    assert a.mla["split_kv_b"] and a.mla["q_lora_rank"] == 24 and a.rope_scaling["rope_type"] == "yarn"
    gate = engine.model.moe_blocks[0].gate
    if family == "deepseek_v3":
        assert gate.config.scoring == "sigmoid_group_topk" and gate.config.n_group == 4
        assert gate.correction_bias is not None and gate.correction_bias.abs().min() > 0
    else:
        assert gate.config.scoring == "softmax_group_greedy" and gate.correction_bias is None
    engine.close()


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_f16_greedy_equals_llama_cpp_at_every_budget(converted, family):
    assert check_gguf_against_llama_cpp(*converted(family)) >= 8
