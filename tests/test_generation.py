"""Generation loop: sampling, seeds, stop strings and ids, EOS, max tokens, detokenization, chat template."""
from __future__ import annotations

import pytest
import torch

from conftest import prompt_ids
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.kv_cache import ContextOverflow
from moepage.engine.sampling import Sampler, SamplingParams
from moepage.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def engine(checkpoints):
    e = Engine.load(EngineConfig(str(checkpoints("qwen3_moe", "float32")), ctx_size=256))
    yield e
    e.close()


def gen(engine, ids, **kw):
    kw.setdefault("ignore_eos", True)
    return list(engine.generate(ids, SamplingParams(**kw)))


def test_seed_reproducible_and_seeds_differ(engine):
    ids = prompt_ids(10, engine.args.vocab_size)
    a = [s.token for s in gen(engine, ids, max_tokens=24, temperature=1.5, seed=7)]
    b = [s.token for s in gen(engine, ids, max_tokens=24, temperature=1.5, seed=7)]
    c = [s.token for s in gen(engine, ids, max_tokens=24, temperature=1.5, seed=8)]
    assert a == b
    assert a != c


def test_max_tokens_and_length_finish(engine):
    out = gen(engine, prompt_ids(5, engine.args.vocab_size), max_tokens=7, temperature=0)
    assert len(out) == 7
    assert [s.finish_reason for s in out] == [None] * 6 + ["length"]


def test_stop_token_ids_and_eos(engine):
    ids = prompt_ids(12, engine.args.vocab_size)
    free = [s.token for s in gen(engine, ids, max_tokens=16, temperature=0)]
    stop_at = free[5]
    first = free.index(stop_at)
    out = gen(engine, ids, max_tokens=16, temperature=0, stop_token_ids=[stop_at])
    assert len(out) == first + 1 and out[-1].finish_reason == "stop" and out[-1].text == ""
    engine.eos_ids.add(stop_at)
    try:
        out = gen(engine, ids, max_tokens=16, temperature=0, ignore_eos=False)
        assert out[-1].finish_reason == "stop" and len(out) == first + 1
    finally:
        engine.eos_ids.discard(stop_at)


def test_stop_string_truncates_text_and_never_leaks(engine):
    ids = engine.tokenizer.encode("def main():\n    return")
    free = "".join(s.text for s in gen(engine, ids, max_tokens=30, temperature=0))
    assert len(free) > 6
    stop = free[3:6]
    out = gen(engine, ids, max_tokens=30, temperature=0, stop=[stop])
    text = "".join(s.text for s in out)
    assert out[-1].finish_reason == "stop"
    assert text == free[: free.index(stop)]


def test_logprobs_are_log_softmax_of_logits(engine):
    ids = prompt_ids(8, engine.args.vocab_size)
    out = gen(engine, ids, max_tokens=1, temperature=0, logprobs=3)
    logits = engine.logits_all(ids)[-1]
    lp = torch.log_softmax(logits.float(), -1)
    assert abs(out[0].logprob - lp.max().item()) < 1e-5
    assert [t for t, _ in out[0].top_logprobs] == torch.topk(lp, 3).indices.tolist()


def test_context_overflow(engine):
    with pytest.raises(ContextOverflow):
        gen(engine, [1] * 300, max_tokens=1)


def test_sampler_filters():
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0])
    for _ in range(20):
        s = Sampler(SamplingParams(temperature=1.0, top_k=2), [], 4)
        assert s(logits).token in (0, 1)
        s = Sampler(SamplingParams(temperature=1.0, top_p=0.5), [], 4)
        assert s(logits).token == 0
        s = Sampler(SamplingParams(temperature=1.0, min_p=0.2), [], 4)
        assert s(logits).token in (0, 1)
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=100.0), [0], 4)
    assert s(logits).token == 1  # token 0 is in the prompt and penalised
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=2.0), [], 4)
    assert s(logits).token == 0 and s(logits).token == 1  # generated once, pushed down by 2.0
    s = Sampler(SamplingParams(temperature=0, logit_bias={3: 100.0}), [], 4)
    assert s(logits).token == 3


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(top_k=-5),
                                 dict(presence_penalty=3), dict(temperature=float("nan")), dict(logprobs=50)])
def test_invalid_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate(100)


def test_detokenizer_handles_multibyte(tokenizer_dir):
    tk = Tokenizer.from_dir(str(tokenizer_dir))
    text = "naïve café — 日本語 🙂 done"
    ids = tk.encode(text)
    d = IncrementalDetokenizer(tk)
    out = "".join(d.push(i) for i in ids) + d.flush()
    assert out == text
    assert "\ufffd" not in out


def test_chat_template_renders_roles_and_tools(tokenizer_dir):
    tk = Tokenizer.from_dir(str(tokenizer_dir))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = tk.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tools=tools)
    assert text.startswith("<|im_start|>system\nBe brief.")
    assert '"name": "get_weather"' in text and text.endswith("<|im_start|>assistant\n")
    ids = tk.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert tk.token_to_id("<|im_start|>") in ids


def test_prefix_cache_reuses_kv_and_matches(checkpoints):
    path = str(checkpoints("qwen3_moe", "float32"))
    plain = Engine.load(EngineConfig(path, ctx_size=256))
    cached = Engine.load(EngineConfig(path, ctx_size=256, prefix_cache=True, prefill_chunk=16))
    system = prompt_ids(60, plain.args.vocab_size, seed=5)
    turns = [system + prompt_ids(6, plain.args.vocab_size, seed=s) for s in (6, 7)]
    for ids in turns:
        a = [s.token for s in gen(plain, ids, max_tokens=12, temperature=0)]
        b = [s.token for s in gen(cached, ids, max_tokens=12, temperature=0)]
        assert a == b
    # the second turn only prefilled what differs from the first turn's KV, from a chunk end (every 16 tokens and
    # after an end-of-turn token: the random system prompt holds one at position 57)
    assert cached.last_stats.prompt_tokens == len(turns[1])
    assert cached.last_stats.cached_prompt_tokens == cached.chunks.exact_end(turns[1], len(system)) == 58
    assert plain.last_stats.cached_prompt_tokens == 0
    assert cached.kv_ids[: len(turns[1])] == turns[1]
    plain.close()
    cached.close()


def test_decode_keeps_special_tool_call_markers(tokenizer_dir, tmp_path):
    """Mistral's [TOOL_CALLS] is a special token: skipping special tokens must not hide it from the parsers."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    hf.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True), AddedToken("<|junk|>", special=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_bytes((tokenizer_dir / "tokenizer_config.json").read_bytes())
    tk = Tokenizer.from_dir(str(tmp_path))
    ids = tk.encode('<|junk|>[TOOL_CALLS][{"name": "f"}]', add_special_tokens=False)
    assert tk.decode(ids) == '[TOOL_CALLS][{"name": "f"}]'
    assert tk.decode(ids, skip_special_tokens=False).startswith("<|junk|>[TOOL_CALLS]")
