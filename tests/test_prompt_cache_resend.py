"""The same chat sent again (a UI's "regenerate", a client retry) and one whose last user message was edited, over
HTTP, on an attention-only model, a sliding-window one (gpt-oss) and a hybrid (Qwen3.5, Gated DeltaNet): the
server re-uses the prompt up to its last message end (the resend) or up to the end of the message before the edited
one, after settling the first reply, because sliding and recurrent layers keep copies at their last few chunk ends
(engine/prompt_cache.py PromptCache.mark), and every answer's tokens and log-probabilities equal a server without
re-use."""
from __future__ import annotations

import openai
import pytest
import torch

from gpt_oss_support import save_gpt_oss
from qwen35_support import one_torch_thread, save_qwen35_text  # noqa: F401 (autouse: one torch thread here)
from moepage.engine.engine import Engine, EngineConfig
from server_support import MODEL_ID, serving, small_demo, wait_until

CHUNK = 16
SYSTEM = "You are a coding agent. Tools: read a file, write a file, list a directory, run a shell command."
MESSAGES = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "List the files in src."},
            {"role": "assistant", "content": "Done: main.py and util.py."},
            {"role": "user", "content": "Now open the first one."}]
EDITED = MESSAGES[:3] + [{"role": "user", "content": "Please open util.py instead."}]


def model(kind: str, root, tokenizer_dir) -> str:
    if kind == "attention":
        return small_demo(root)
    if kind == "sliding":  # window 8: the prompt runs far past it
        return str(save_gpt_oss(root, dtype=torch.bfloat16))
    return str(save_qwen35_text(root, tokenizer_dir, seed=3))


def message_ends(engine: Engine, messages) -> tuple[list[int], list[int]]:
    """(the prompt's token ids as the server renders them, the positions right after each message end)."""
    tk = engine.tokenizer
    ids = tk.encode(tk.render_chat(messages, add_generation_prompt=True), add_special_tokens=False)
    return ids, [i + 1 for i, t in enumerate(ids) if t in engine.chunks.ends]


@pytest.mark.parametrize("kind", ["attention", "sliding", "hybrid"])
def test_a_resent_or_edited_chat_reuses_its_prompt_and_answers_as_without_reuse(tmp_path, tokenizer_dir, kind):
    path = model(kind, tmp_path / kind, tokenizer_dir)
    engines = [Engine.load(EngineConfig(model=path, ctx_size=512, threads=1, prefill_chunk=CHUNK, prefix_cache=reuse))
               for reuse in (True, False)]
    cached = engines[0]
    try:
        with serving(engines[0]) as (cached_url, _), serving(engines[1]) as (plain_url, _):
            clients = [openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=60)
                       for u in (cached_url, plain_url)]

            def ask(messages) -> int:
                got = [c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16, temperature=0,
                                                 logprobs=True) for c in clients]
                answers = [(r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content])
                           for r in got]
                assert answers[0] == answers[1]
                assert got[1].usage.prompt_tokens_details.cached_tokens == 0
                assert wait_until(lambda: all(s.settle_ids is None for s in cached.slots), 30)  # reply settled
                return got[0].usage.prompt_tokens_details.cached_tokens

            ids, ends = message_ends(cached, MESSAGES)
            assert len(ends) >= 4 and ends[-1] > len(ids) - 10  # all but the generation prompt
            assert ask(MESSAGES) == 0
            # 16 tokens pass a chunk end: the reply is settled past the prompt, so its own end is the newest mark
            assert cached.prompt_cache.stats.settled_tokens > 0 and len(cached.slots[0].exact_ids) > len(ids)
            # the same prompt again: up to the last user message's end, the chunk end before the generation prompt
            assert ask(MESSAGES) == ends[-1] == cached.chunks.exact_end(ids, len(ids) - 1)
            assert cached.last_stats.prompt_tokens == len(ids)
            edited, edited_ends = message_ends(cached, EDITED)
            common = next(i for i, (a, b) in enumerate(zip(ids, edited)) if a != b)
            # the last user message edited: up to the assistant message's end before it
            assert ask(EDITED) == edited_ends[-2] == ends[-2] == cached.chunks.exact_end(edited, common)
            assert ask(MESSAGES) == ends[-1]  # the first wording again: its stashed snapshot carries that mark
    finally:
        for e in engines:
            e.close()
