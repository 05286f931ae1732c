"""The prompt cache over real HTTP with the openai client: an agent conversation with a title request between turns
re-uses each turn's prompt (usage.prompt_tokens_details.cached_tokens, /metrics), and turn 2 starts much sooner."""
from __future__ import annotations

import random
import time

import httpx
import openai
import pytest

from moepage.demo import DemoSpec, build_demo_model
from moepage.engine.engine import Engine, EngineConfig
from server_support import MODEL_ID, serving

# Wide enough that a 1.5k-token prefill takes far longer than HTTP and templating.
PREFILL_BOUND = DemoSpec(layers=4, hidden=256, experts=8, moe_intermediate=256, vocab=400)
CHUNK = 64
WORDS = ("read", "file", "path", "write", "edit", "search", "the", "tool", "returns", "lines", "of", "a", "shell",
         "command", "run", "grep", "pattern", "directory", "list", "json", "argument", "string", "must", "be", "when")


def system_prompt(words: int) -> str:
    rng = random.Random(0)
    return "You are a coding agent. Tools:\n" + " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_demo_model(tmp_path_factory.mktemp("agent"), PREFILL_BOUND)
    eng = Engine.load(EngineConfig(model=path, ctx_size=4096, threads=1, prefill_chunk=CHUNK, prefix_cache=True))
    yield eng
    eng.close()


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_agent_turns_reuse_the_previous_prompt_and_start_sooner(engine):
    with serving(engine) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "system", "content": system_prompt(450)},
                    {"role": "user", "content": "List the files in src."}]
        results, titles = [], []
        for turn in range(3):
            t0 = time.perf_counter()
            r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=1, temperature=0)
            results.append((time.perf_counter() - t0, r.usage))
            title = client.chat.completions.create(
                model=MODEL_ID, max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": "Write a short title for the conversation."},
                          {"role": "user", "content": messages[1]["content"]}])
            titles.append(title.usage)
            # the first title shares nothing with the agent's turn; later ones re-use the first title's prompt
            assert (title.usage.prompt_tokens_details.cached_tokens > 0) == (turn > 0)
            messages += [{"role": "assistant", "content": r.choices[0].message.content or "ok"},
                         {"role": "user", "content": f"Now open file number {turn}."}]
        (t1, u1), (t2, u2), (t3, u3) = results
        print(f"prompt tokens {u1.prompt_tokens}, {u2.prompt_tokens}, {u3.prompt_tokens}; cached "
              f"{u2.prompt_tokens_details.cached_tokens}, {u3.prompt_tokens_details.cached_tokens}; "
              f"time to first token {t1:.3f} s, {t2:.3f} s, {t3:.3f} s")
        assert u1.prompt_tokens > 1000 and u1.prompt_tokens_details.cached_tokens == 0
        assert u2.prompt_tokens_details.cached_tokens >= 0.9 * u1.prompt_tokens
        assert u3.prompt_tokens_details.cached_tokens >= 0.9 * u2.prompt_tokens
        assert t2 < 0.3 * t1 and t3 < 0.3 * t1  # measured far lower; the bound leaves room for a busy machine

        stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=2, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        usage = [c.usage for c in stream if c.usage is not None]
        assert usage[0].prompt_tokens_details.cached_tokens >= 0.9 * u3.prompt_tokens
        reused, computed = metric(url, "moepage_prompt_tokens_reused_total"), \
            metric(url, "moepage_prompt_tokens_computed_total")
        cached = sum(u.prompt_tokens_details.cached_tokens for u in (u2, u3, usage[0], *titles))
        assert reused == cached
        assert computed > 0 and metric(url, "moepage_prompt_cache_capacity_bytes") == engine.prompt_cache.capacity


def test_a_hybrid_qwen35_conversation_reuses_each_turn_and_answers_as_without_reuse(tmp_path, tokenizer_dir):
    """Qwen3.5-MoE (Gated DeltaNet + attention layers) over HTTP: 3 turns with a title request between them; each
    turn re-uses >= 90% of the previous turn's prompt (the recurrent state restored at the last chunk end, after
    the user's <|im_end|>), and every answer's tokens and log-probabilities equal a server without re-use."""
    from qwen35_support import save_qwen35_text

    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = str(save_qwen35_text(tmp_path / "qwen35", tokenizer_dir, seed=3))
    engines = [Engine.load(EngineConfig(model=path, ctx_size=512, threads=1, prefill_chunk=16, prefix_cache=reuse))
               for reuse in (True, False)]
    try:
        with serving(engines[0]) as (cached_url, _), serving(engines[1]) as (plain_url, _):
            clients = [openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=60)
                       for u in (cached_url, plain_url)]

            def ask(messages):
                got = [c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True) for c in clients]
                answers = [(r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content])
                           for r in got]
                assert answers[0] == answers[1]
                assert got[1].usage.prompt_tokens_details.cached_tokens == 0
                return got[0]

            messages = [{"role": "system", "content": system_prompt(50)},
                        {"role": "user", "content": "List the files in src."}]
            usages = []
            for turn in range(3):
                r = ask(messages)
                usages.append(r.usage)
                ask([{"role": "system", "content": "Write a short title for the conversation."},
                     {"role": "user", "content": messages[1]["content"]}])
                messages += [{"role": "assistant", "content": r.choices[0].message.content or "ok"},
                             {"role": "user", "content": f"Now open file number {turn}."}]
        print("prompt tokens", [u.prompt_tokens for u in usages], "cached",
              [u.prompt_tokens_details.cached_tokens for u in usages])
        assert usages[0].prompt_tokens > 150 and usages[0].prompt_tokens_details.cached_tokens == 0
        for before, now in zip(usages, usages[1:]):
            assert now.prompt_tokens_details.cached_tokens >= 0.9 * before.prompt_tokens
    finally:
        for e in engines:
            e.close()
        torch.set_num_threads(threads)
