"""Prompt cache (moepage/engine/prompt_cache.py): re-used prefixes give a fresh prefill's bits, several
conversations kept in LRU order within their bytes, the bytes inside the memory budget, the hybrid state shape."""
from __future__ import annotations

import pytest
import torch

from conftest import prompt_ids
from moepage.engine.attention.gated_delta import GatedDeltaNet, GatedDeltaShape
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.kv_cache import KVCache
from moepage.engine.prompt_cache import ChunkSchedule, LayerStates, PromptCache
from moepage.engine.sampling import SamplingParams
from server_support import small_demo

CHUNK = 16


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("prompt-cache"))


def load(path, dtype, **over) -> Engine:
    return Engine.load(EngineConfig(model=path, ctx_size=512, threads=1, dtype=dtype, prefill_chunk=CHUNK, **over))


def greedy(engine, ids, n=10) -> tuple[list[int], list[float]]:
    steps = list(engine.generate(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)))
    return [s.token for s in steps], [s.logprob for s in steps]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reused_prefixes_give_the_fresh_prefills_tokens_and_logprobs(demo_path, dtype):
    """An agent conversation with a title request between turns, and prompts that diverge off a chunk boundary:
    every greedy token and its log-probability (the logits' bits) equal those of a prefill from the first token."""
    plain, cached = load(demo_path, dtype), load(demo_path, dtype, prefix_cache=True)
    vocab = plain.args.vocab_size
    system = prompt_ids(77, vocab, seed=3)
    turn = system + prompt_ids(9, vocab, seed=4)
    title = prompt_ids(41, vocab, seed=5)
    try:
        for k in range(3):
            want = greedy(plain, turn)
            assert greedy(cached, turn) == want
            previous = len(turn)
            assert greedy(cached, title) == greedy(plain, title)
            turn = turn + want[0] + prompt_ids(7 + k, vocab, seed=10 + k)  # the reply, then the user's next message
            got = greedy(cached, turn)
            assert got == greedy(plain, turn)
            # the title request in between evicted nothing; generated tokens are not an exact state
            assert cached.last_stats.cached_prompt_tokens == cached.chunks.exact_end(turn, previous)
            assert cached.last_stats.cached_prompt_tokens >= previous // CHUNK * CHUNK
            turn = turn + got[0][:3]
        for cut in (CHUNK * 3 + 5, 1, CHUNK * 5 - 1):  # a prompt branching off inside a chunk
            branch = turn[:cut] + prompt_ids(20, vocab, seed=cut)
            assert greedy(cached, branch) == greedy(plain, branch)
            assert cached.last_stats.cached_prompt_tokens == cached.chunks.exact_end(branch, cut)
        assert plain.last_stats.cached_prompt_tokens == 0
    finally:
        plain.close()
        cached.close()


def kv_state(tokens: int = 64) -> KVCache:
    return KVCache(num_layers=2, num_kv_heads=1, head_dim=4, max_tokens=tokens, dtype=torch.float32)


def prefill(cache: PromptCache, kv: KVCache, live: list[int], ids: list[int]) -> tuple[int, list[int]]:
    """What Engine.prefill does to the state: re-use, then write each new position's 'keys' (its token id)."""
    start = cache.begin(kv, live, ids)
    kv.length = start
    for p in range(start, len(ids)):
        kv.k[:, :, :, p] = ids[p]
        kv.v[:, :, :, p] = -ids[p]
    kv.length = len(ids)
    return start, list(ids[: cache.schedule.exact_end(ids, len(ids))])


def test_chunks_end_after_c_tokens_or_an_end_of_turn_token_and_only_the_tokens_before_fix_them():
    schedule = ChunkSchedule(4, frozenset({9}))
    ids = [1, 2, 9, 3, 4, 5, 6, 7, 9, 9, 8]
    ends, s = [], 0
    while s < len(ids):
        s, fixed = schedule.end(ids, s)
        ends.append((s, fixed))
    assert ends == [(3, True), (7, True), (9, True), (10, True), (11, False)]  # the last is cut by the prompt's end
    assert [schedule.exact_end(ids, n) for n in (2, 3, 8, 11)] == [0, 3, 7, 10]
    for cut in range(len(ids)):  # a prompt sharing a prefix is cut the same way inside it
        longer = ids[:cut] + [5, 9, 1, 2, 3, 4]
        assert schedule.exact_end(longer, cut) == schedule.exact_end(ids, cut)
    assert ChunkSchedule(4).exact_end(ids, 11) == 8  # no end tokens: every 4 tokens


def test_a_conversations_next_turn_reuses_its_prompt_up_to_the_generation_prompt():
    """ChatML turns: each message ends with <|im_end|>, so the next turn re-uses all but the generation prompt."""
    kv = kv_state(128)
    end, start_msg = 2, 1
    cache = PromptCache(capacity_bytes=1 << 20, chunks=ChunkSchedule(16, frozenset({end})))

    def message(n, seed):
        return [start_msg] + [10 + (seed * 7 + i) % 50 for i in range(n)] + [end, 3]

    turn1 = message(37, 1) + message(5, 2) + [start_msg, 4, 3]  # system, user, the generation prompt
    start, live = prefill(cache, kv, [], turn1)
    turn2 = turn1 + [20, 21, end, 3] + message(6, 3) + [start_msg, 4, 3]  # the reply, the next user message
    start, live = prefill(cache, kv, live, turn2)
    assert start == len(turn1) - 4  # up to the user message's <|im_end|>; 16-token chunks alone give 32


def test_conversations_alternate_without_evicting_each_other_and_lru_goes_first():
    kv = kv_state()
    entry = 2 * 2 * 1 * 16 * 4 * 4  # k and v of 16 positions
    cache = PromptCache(capacity_bytes=2 * entry, chunks=4)
    a, b, c = [1] * 16 + [2], [3] * 16 + [4], [5] * 16 + [6]
    live: list[int] = []
    for ids in (a, b):
        start, live = prefill(cache, kv, live, ids)
        assert start == 0
    start, live = prefill(cache, kv, live, a + [7])  # a comes back from the cache, b is stashed
    assert start == 16 and torch.equal(kv.k[0, 0, 0, :16, 0], torch.ones(16))
    start, live = prefill(cache, kv, live, b + [8])
    assert start == 16 and torch.equal(kv.k[0, 0, 0, :16, 0], torch.full((16,), 3.0))
    assert cache.stats.evictions == 0
    start, live = prefill(cache, kv, live, c)  # b stashed; the cache holds a and b
    start, live = prefill(cache, kv, live, [9] * 20)  # c stashed: a, the least recently used, goes
    assert cache.stats.evictions == 1
    assert prefill(cache, kv, live, a + [7])[0] == 0
    s = cache.snapshot_stats()
    assert s["bytes"] <= s["capacity_bytes"] and s["reused_tokens"] == 32 and s["hits"] == 2


def test_a_prompt_extending_the_live_state_copies_nothing():
    kv = kv_state()
    cache = PromptCache(capacity_bytes=1 << 20, chunks=4)
    start, live = prefill(cache, kv, [], list(range(10)))
    start, live = prefill(cache, kv, live, list(range(30)))
    assert start == 8 and cache.stats.stored == 0
    start, live = prefill(cache, kv, live, list(range(30)))  # the same prompt again: the last chunk runs again
    assert start == 28 and cache.stats.stored == 0


def test_prompt_cache_bytes_are_taken_out_of_the_memory_budget(demo_path):
    free = load(demo_path, "float32", prefix_cache=True)
    kv = free.plan.kv_bytes
    assert free.prompt_cache.capacity == kv and free.plan.prompt_cache_bytes == kv  # default: one context
    free.close()
    budget = free.plan.resident_bytes + kv + free.plan.buffer_bytes + 4 * free.plan.expert_bytes_each + kv
    plain = load(demo_path, "float32", memory_budget=budget)
    cached = load(demo_path, "float32", memory_budget=budget, prefix_cache=True, prompt_cache_bytes=kv)
    try:
        assert cached.plan.expert_cache_bytes == plain.plan.expert_cache_bytes - kv
        assert "prompt cache" in cached.memory_summary() and "prompt cache" not in plain.memory_summary()
    finally:
        plain.close()
        cached.close()


def test_recurrent_layer_states_plug_in_and_restore_exactly():
    """A Gated DeltaNet layer's state (snapshot()/restore()/nbytes, no positions) and a KV cache in one
    LayerStates: a state restored from the cache continues to the bits of a fresh run."""
    shape = GatedDeltaShape(hidden=32, num_k_heads=2, num_v_heads=2, k_head_dim=8, v_head_dim=8, chunk=8)
    g = torch.Generator().manual_seed(0)
    weights = {n: 0.2 * torch.randn(s, generator=g) for n, s in shape.weight_shapes("qwen3_5_moe").items()}
    mixer = GatedDeltaNet(shape, weights)
    x = torch.randn(100, 32, generator=g)

    def run(states: LayerStates, cache: PromptCache | None, live, ids) -> tuple[torch.Tensor, list[int]]:
        start = cache.begin(states, live, ids) if cache else 0
        out = None
        for s in range(start, len(ids), 16):
            out = mixer(x[ids[s : s + 16]], states.layers[1])
            if s + 16 <= len(ids):
                states.layers[0].length = s + 16
                states.mark(s + 16)
        return out, list(ids[: len(ids) // 16 * 16])

    new = lambda: LayerStates([kv_state(128), mixer.new_state()])  # noqa: E731
    cached, cache = new(), PromptCache(1 << 20, chunks=16)
    first, second, other = list(range(40)), list(range(40)) + [60, 61, 62], list(range(50, 99))
    live = run(cached, cache, [], first)[1]
    live = run(cached, cache, live, other)[1]
    out, _ = run(cached, cache, live, second)
    assert cache.stats.reused_tokens == 32 and cached.layers[1].tokens == 43
    fresh = new()
    assert torch.equal(out, run(fresh, None, [], second)[0])
    assert torch.equal(cached.layers[1].recurrent, fresh.layers[1].recurrent)


def test_default_prompt_cache_bytes_never_crowds_out_the_experts():
    from moepage.engine.engine import default_prompt_cache_bytes

    kv = 1000
    assert default_prompt_cache_bytes(None, 5000, kv, 100, 400) == kv  # no budget: one full context
    assert default_prompt_cache_bytes(5000 + kv + 100 + 400 + 600, 5000, kv, 100, 400) == 300  # half the spare
    assert default_prompt_cache_bytes(5000 + kv + 100 + 400 + 10**6, 5000, kv, 100, 400) == kv
    assert default_prompt_cache_bytes(5000 + kv + 100 + 400, 5000, kv, 100, 400) == 0  # a tight budget: none


def test_recurrent_states_keep_their_last_marks_within_the_cache_bytes_and_a_resent_prompt_reuses_them():
    """A Gated DeltaNet layer marked at each 16-token chunk end keeps copies at up to keep_marks of them (message ends
    first); the copies beyond the newest count in the cache's bytes and give way to its capacity; the same prompt
    sent again goes back to the chunk end before its last token, if kept, and continues to a fresh run's bits."""
    shape = GatedDeltaShape(hidden=32, num_k_heads=2, num_v_heads=2, k_head_dim=8, v_head_dim=8, chunk=8)
    g = torch.Generator().manual_seed(1)
    weights = {n: 0.2 * torch.randn(s, generator=g) for n, s in shape.weight_shapes("qwen3_5_moe").items()}
    mixer = GatedDeltaNet(shape, weights)
    x = torch.randn(100, 32, generator=g)
    one = mixer.new_state().nbytes  # one copy

    def run(states: LayerStates, cache: PromptCache, live, ids) -> tuple[int, torch.Tensor]:
        start = cache.begin(states, live, ids)
        s, out = start, None
        while s < len(ids):
            e, fixed = cache.schedule.end(ids, s)
            out = mixer(x[ids[s:e]], states.layers[1])
            states.layers[0].length = e
            if fixed:
                cache.mark(states, ids, e)
            s = e
        return start, out

    ids = list(range(48))  # chunk ends 16, 32, 48
    fresh = run(LayerStates([kv_state(128), mixer.new_state()]), PromptCache(0, 16), [], ids)[1]
    for capacity, keep, marks in ((1 << 20, 4, (16, 32, 48)), (1 << 20, 2, (32, 48)), (one, 4, (32, 48)),
                                  (one - 1, 4, (48,))):
        states, cache = LayerStates([kv_state(128), mixer.new_state()]), PromptCache(capacity, 16, keep_marks=keep)
        assert run(states, cache, [], ids)[0] == 0
        assert states.marks == marks and cache.nbytes == (len(marks) - 1) * one <= capacity
        start, out = run(states, cache, ids, ids)  # sent again: re-use leaves the last chunk to prefill
        assert start == (32 if 32 in marks else 0) and torch.equal(out, fresh)

    ends = ChunkSchedule(16, frozenset({99}))  # a message end after position 5: chunk ends 6, 22, 38
    ids = list(range(5)) + [99] + list(range(10, 44))
    states, cache = LayerStates([kv_state(128), mixer.new_state()]), PromptCache(1 << 20, ends, keep_marks=2)
    run(states, cache, [], ids)
    assert states.marks == (6, 38)  # the message end outranks the more recent 22
    other = ids[:30] + [50, 51, 52]
    assert run(states, cache, ids[:38], other)[0] == 6  # 22 is gone: back to the message end
    snap = states.snapshot(6)
    assert snap.restorable == (6,) and snap.reach(5) == 0 and snap.reach(40) == 6
