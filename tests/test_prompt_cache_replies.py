"""A finished reply is settled into the exact state while the engine is idle (engine/sequence.py settle): its tokens
are prefilled again as a fresh prefill of prompt + reply computes them, so the next turn, which resends the reply,
re-uses it too, bit for bit, and only as far as the resent tokens really equal the generated ones."""
from __future__ import annotations

import httpx
import pytest

from conftest import prompt_ids
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.prompt_cache import ChunkSchedule
from moepage.engine.sampling import SamplingParams
from moepage.engine.sequence import settle
from server_support import MODEL_ID, serving, small_demo, wait_until

CHUNK = 16


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("prompt-cache-replies"))


def load(path, **over) -> Engine:
    return Engine.load(EngineConfig(model=path, ctx_size=512, threads=1, dtype="bfloat16", prefill_chunk=CHUNK,
                                    **over))


def greedy(engine, ids, n=8, **params) -> tuple[list[int], list[float]]:
    steps = list(engine.generate(ids, SamplingParams(max_tokens=n, temperature=0, logprobs=0, **params)))
    return [s.token for s in steps], [s.logprob for s in steps]


def end_of_turn(engines, token: int):
    """Make `token` close a message, as <|im_end|> does (the tiny model's own ids end nothing it generates)."""
    for e in engines:
        e.chunks = ChunkSchedule(CHUNK, e.chunks.ends | {token})
        if e.prompt_cache is not None:
            e.prompt_cache.schedule = e.chunks


def test_a_settled_reply_is_reused_by_the_next_turn_exactly(demo_path):
    plain, cached = load(demo_path), load(demo_path, prefix_cache=True)
    vocab = plain.args.vocab_size
    try:
        prompt = prompt_ids(53, vocab, seed=7)
        free = greedy(plain, prompt, 12, ignore_eos=True)[0]
        i = next(i for i in range(3, 12) if free[i] not in free[:i] and free[i] not in prompt)
        end_of_turn([plain, cached], free[i])  # the reply ends with it, as a chat reply with <|im_end|>
        reply = greedy(cached, prompt, 12, stop_token_ids=[free[i]])[0]
        assert reply == free[: i + 1]
        slot = cached.slots[0]
        before = len(slot.exact_ids)
        assert slot.settle_ids == prompt + reply and before < len(prompt)
        while settle(cached):
            pass
        assert slot.exact_ids == prompt + reply and slot.settle_ids is None
        assert cached.prompt_cache.stats.settled_tokens == len(prompt + reply) - before

        nxt = prompt + reply + prompt_ids(9, vocab, seed=8)  # the next turn resends the reply
        assert greedy(cached, nxt, ignore_eos=True) == greedy(plain, nxt, ignore_eos=True)
        assert cached.last_stats.cached_prompt_tokens == len(prompt + reply)

        # the reply as a template re-renders it may differ: only the true common prefix is re-used
        reply = greedy(cached, nxt, 12, stop_token_ids=[free[i]])[0]
        while settle(cached):
            pass
        cut = len(nxt) + len(reply) - 2
        other = next(t for t in range(vocab) if t != reply[-2] and t not in cached.chunks.ends)
        branch = (nxt + reply)[:cut] + [other, reply[-1]] + prompt_ids(5, vocab, seed=9)
        assert greedy(cached, branch, ignore_eos=True) == greedy(plain, branch, ignore_eos=True)
        assert cached.last_stats.cached_prompt_tokens == cached.chunks.exact_end(branch, cut) < cut
    finally:
        plain.close()
        cached.close()


def test_the_server_settles_a_reply_while_idle_and_the_next_request_reuses_it(demo_path):
    plain = load(demo_path)
    vocab = plain.args.vocab_size
    prompt = prompt_ids(40, vocab, seed=11)
    free = greedy(plain, prompt, 12, ignore_eos=True)[0]
    plain.close()
    i = next(i for i in range(3, 12) if free[i] not in free[:i] and free[i] not in prompt)
    engine = load(demo_path, prefix_cache=True)
    end_of_turn([engine], free[i])  # before the engine computes anything: every state follows this schedule
    try:
        with serving(engine) as (url, _):
            def complete(ids, **extra):
                body = {"model": MODEL_ID, "prompt": ids, "max_tokens": 12, "temperature": 0, **extra}
                r = httpx.post(url + "/v1/completions", json=body, timeout=60)
                assert r.status_code == 200, r.text
                return r.json()

            assert complete(prompt, stop_token_ids=[free[i]])["choices"][0]["finish_reason"] == "stop"
            assert wait_until(lambda: all(s.settle_ids is None for s in engine.slots), 30)
            # the reply, through its end-of-turn token, is an exact state now
            assert engine.slots[0].exact_ids == prompt + free[: i + 1]
            nxt = prompt + free[: i + 1] + prompt_ids(6, vocab, seed=12)
            usage = complete(nxt, ignore_eos=True)["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == len(prompt) + i + 1
    finally:
        engine.close()


def test_harmony_prompts_end_a_chunk_at_every_message_end(tmp_path):
    """gpt-oss's messages close with <|end|> (its replies with <|return|> / <|call|>, the eos ids): a prefill
    chunk ends after each, so a next turn re-uses its prompt to the last message, not only the C-token grid."""
    from harmony_support import save_harmony_tokenizer
    from moepage.engine.prompt_cache import PromptCache, message_end_ids
    from moepage.engine.tokenizer import Tokenizer

    info = save_harmony_tokenizer(tmp_path)
    tk = Tokenizer.from_dir(str(tmp_path))
    ends = message_end_ids(tk)
    assert info["ids"]["<|end|>"] in ends and info["ids"]["<|message|>"] not in ends
    C = 4096  # above the prompts' length: only message ends cut them
    schedule = ChunkSchedule(C, frozenset(info["eos_token_ids"]) | ends)
    messages = [{"role": "system", "content": "You are a coding agent. " * 40},
                {"role": "user", "content": "List the files in src."}]
    turn1 = tk.encode(tk.render_chat(messages, add_generation_prompt=True), add_special_tokens=False)
    messages += [{"role": "assistant", "content": "Done."}, {"role": "user", "content": "Now open one."}]
    turn2 = tk.encode(tk.render_chat(messages, add_generation_prompt=True), add_special_tokens=False)
    reused = PromptCache(1 << 20, schedule).reusable(turn1, turn2)
    last_end = max(i for i, t in enumerate(turn1) if t == info["ids"]["<|end|>"]) + 1
    assert len(turn2) < C and reused == last_end > len(turn1) - 10  # all but <|start|>assistant
    assert PromptCache(1 << 20, ChunkSchedule(C, frozenset(info["eos_token_ids"]))).reusable(turn1, turn2) == 0
