"""Gemma 4 MoE as a GGUF from llama.cpp's own converter (arch gemma4: fused ffn_gate_up_exps, the per-expert scale as
ffn_down_exps.scale, the router scale as ffn_gate_inp.scale, proportional RoPE as rope_freqs factors; the llama.cpp
inside llama-cpp-python 0.3.36 runs it): served with experts paged from the file, logits close to transformers' on
the source checkpoint, greedy tokens equal to llama.cpp's up to the first router near-tie, at every expert budget."""
from __future__ import annotations

import httpx
import pytest
import torch

from gemma4_support import load_reference, router_margins, save_gemma4, spm_tokenizer
from gguf_support import LlamaCppGreedy, convert, find_converter, llama_cpp_module
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.sampling import SamplingParams
from moepage.paging.gguf_stacked_experts import GGUFStackedExpertSource
from server_support import MODEL_ID, serving

# rows a multiple of 256 (K-quant friendly), the 5:1 layers with k = v full layers; router weights large enough that
# no top-k choice of this prompt and its continuation is a near-tie (tests/gemma4_support.py router_margins), q/k norm
# weights small enough that the scale-1 attention is not near one-hot (where f16 rounding would swing it)
SHAPE = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, head_dim=64, global_head_dim=128)
ROUTER_TIE = 0.01  # as tests/test_gguf_families.py: llama.cpp's rounded activations may pick another expert there
PROMPT = list(range(300, 310))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    llama_cpp_module()
    root = tmp_path_factory.mktemp("gemma4-gguf")
    converter = find_converter(str(root / "src"))
    vocab = spm_tokenizer(root / "tok")
    hf = save_gemma4(root / "hf", root / "tok", vocab_size=vocab, router_std=16.0, qk_norm=0.25, **SHAPE)
    out = root / "model-f16.gguf"
    convert(converter, [(str(hf), str(out), "f16")])
    return hf, str(out)


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
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    engine = Engine.load(EngineConfig(path, dtype="float32", tokenizer=False))
    ours = [s.token for s in engine.generate(PROMPT, params)]
    llm = LlamaCppGreedy(path)
    try:
        theirs, rows = llm.generate(PROMPT, 32)
    finally:
        llm.close()
    margins = router_margins(load_reference(hf), PROMPT + theirs)
    tie = (margins < ROUTER_TIE).nonzero()
    n = min(32, (int(tie[0]) if len(tie) else len(margins)) - len(PROMPT) + 1)
    assert n >= 8, f"a router near-tie after {n} tokens; pick a prompt without one"
    logits = engine.logits_all(PROMPT + theirs)[len(PROMPT) - 1 : len(PROMPT) - 1 + n]
    gap = (logits - torch.stack([torch.from_numpy(r) for r in rows[:n]])).abs().max().item()
    assert gap < 0.05, f"logits differ from llama.cpp's by {gap} within {n} tokens"
    i = next((k for k, (x, y) in enumerate(zip(ours[:n], theirs[:n])) if x != y), None)
    if i is not None:  # only where llama.cpp's own top two are within the logit gap
        assert float(rows[i][theirs[i]] - rows[i][ours[i]]) < 3 * gap, (i, ours, theirs)
    a, each = engine.args, engine.plan.expert_bytes_each
    engine.close()
    split_gguf(path, str(tmp_path / "split"))
    for where in (path, str(tmp_path / "split")):
        for budget in (each * len(a.moe_layers) * a.num_experts // 4, a.top_k * each):  # 25% and the minimum
            paged = Engine.load(EngineConfig(where, dtype="float32", tokenizer=False, expert_cache_bytes=budget,
                                             preload=False))
            assert [s.token for s in paged.generate(PROMPT, params)] == ours, (where, budget)
            assert paged.cache.stats.snapshot()["evictions"] > 0
            paged.close()


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
