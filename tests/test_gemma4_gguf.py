"""Gemma 4 MoE as a GGUF from llama.cpp's own converter (arch gemma4: fused ffn_gate_up_exps, the per-expert scale as
ffn_down_exps.scale, the router scale as ffn_gate_inp.scale, proportional RoPE as rope_freqs factors; the llama.cpp
inside llama-cpp-python 0.3.36 runs it): served with experts paged from the file, logits close to transformers' on
the source checkpoint, greedy tokens equal to llama.cpp's up to the first router near-tie, at every expert budget."""
from __future__ import annotations

import httpx
import pytest
import torch

from gemma4_support import load_reference, router_margins, save_gemma4, spm_tokenizer
from gguf_support import ROUTER_TIE, check_paged_gguf, first_tie, hf_and_gguf, llama_cpp_module
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)
from moepage.engine.engine import Engine, EngineConfig
from moepage.paging.gguf_stacked_experts import GGUFStackedExpertSource
from server_support import MODEL_ID, serving

# rows a multiple of 256 (K-quant friendly), the 5:1 layers with k = v full layers; router weights large enough that
# no top-k choice of this prompt and its continuation is a near-tie (tests/gemma4_support.py router_margins), q/k norm
# weights small enough that the scale-1 attention is not near one-hot (where f16 rounding would swing it)
SHAPE = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, head_dim=64, global_head_dim=128)
PROMPT = list(range(300, 310))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    def make_hf(root):
        return save_gemma4(root / "hf", root / "tok", vocab_size=spm_tokenizer(root / "tok"), router_std=16.0,
                           qk_norm=0.25, **SHAPE)

    return hf_and_gguf(tmp_path_factory, "gemma4-gguf", make_hf)


def test_gguf_reads_the_gemma4_layers(converted):
    _, path = converted
    engine = Engine.load(EngineConfig(path, dtype="float32", tokenizer=False))
    a = engine.args
    assert a.family == "gemma4" and a.mixers == ["gemma4_sliding_attention"] * 5 + ["gemma4_full_attention"]
    full = a.attention_kinds["gemma4_full_attention"]
    assert (full["head_dim"], full["kv_heads"], full["k_eq_v"], full["freq_factors"]) == (128, 1, True, True)
    assert a.final_logit_softcapping == 30.0 and a.embed_scale == 16.0
    assert isinstance(engine.ckpt.experts, GGUFStackedExpertSource)
    assert engine.plan.expert_bytes_each == 3 * 256 * 256 * 2  # f16 gate, up, down as stored
    engine.close()


def test_f16_logits_near_transformers(converted):
    hf, path = converted
    ids = PROMPT + list(range(100, 140))
    with torch.no_grad():
        want = load_reference(hf)(input_ids=torch.tensor([ids])).logits[0]
    engine = Engine.load(EngineConfig(path, dtype="float32", tokenizer=False))
    got = engine.logits_all(ids)
    engine.close()
    assert router_margins(load_reference(hf), ids).min() > ROUTER_TIE  # the same experts: only f16 rounding
    gap = (got - want).abs().max().item()  # f16 weights (and llama.cpp's f16 activations): 0.08 measured
    assert gap < 0.15, f"f16 GGUF logits differ from transformers' fp32 by {gap}"


def test_f16_greedy_equals_llama_cpp_at_every_budget(tmp_path, converted):
    from moepage.surgery.split_gguf import split_gguf

    hf, path = converted
    split_gguf(path, str(tmp_path / "split"))
    engine = Engine.load(EngineConfig(path, dtype="float32", tokenizer=False))
    check_paged_gguf(engine, path, PROMPT, lambda seq: first_tie(router_margins(load_reference(hf), seq)),
                     also=[str(tmp_path / "split")], tokenizer=False)


def test_gguf_tokenizer_and_template_match_llama_cpp_over_http(converted):
    """The GGUF's own tokenizer ("gemma4": SentencePiece-style BPE with byte fallback) encodes as llama.cpp does, and
    its chat template (tokenizer.chat_template, Gemma 4's) is what the server renders."""
    _, path = converted
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    engine = Engine.load(EngineConfig(path, dtype="float32", ctx_size=256))
    tok = engine.tokenizer
    for text in ["import os\nimport sys\n\ndef main():\n", "  Hello   w\u00f6rld \u2014 \u4f60\u597d \U0001f389",
                 "<turn|>\n<|channel>thought\n<channel|>"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=True), text
    assert tok.decode(tok.encode("  Hello   w\u00f6rld \U0001f389", add_special_tokens=False)) == \
        "  Hello   w\u00f6rld \U0001f389"  # bytes outside the vocabulary come back through <0xNN>
    messages = [{"role": "user", "content": "Hello"}]
    rendered = tok.render_chat(messages)
    assert rendered.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    with serving(engine) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL_ID, "messages": messages, "max_tokens": 4,
                                                           "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(rendered, add_special_tokens=False))
    engine.close()
