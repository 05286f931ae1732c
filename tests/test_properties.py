"""Property tests: routing variants and the expert cache's byte budget and LRU order."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepage.kernels.routing import RoutingConfig, route
from moepage.paging.cache import ExpertCache


@st.composite
def logits_and_cfg(draw):
    T = draw(st.integers(1, 6))
    E = draw(st.sampled_from([4, 8, 16]))
    K = draw(st.integers(1, min(E, 6)))
    seed = draw(st.integers(0, 2**31 - 1))
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * draw(st.floats(0.1, 10.0))
    return logits, K


@settings(max_examples=60, deadline=None)
@given(logits_and_cfg(), st.booleans())
def test_softmax_topk_properties(data, norm):
    logits, K = data
    w, idx = route(logits, RoutingConfig(top_k=K, norm_topk_prob=norm))
    probs = torch.softmax(logits, -1)
    assert idx.shape == (logits.shape[0], K)
    # the chosen experts are the K largest, in descending order, each distinct
    assert torch.all(w[:, :-1] >= w[:, 1:])
    for t in range(logits.shape[0]):
        assert len(set(idx[t].tolist())) == K
        kth = torch.topk(probs[t], K).values[-1]
        assert torch.all(probs[t, idx[t]] >= kth - 1e-7)
    if norm:
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)
    else:
        assert torch.allclose(w, probs.gather(1, idx), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(logits_and_cfg())
def test_mixtral_topk_then_softmax_equivalence(data):
    logits, K = data
    w, idx = route(logits, RoutingConfig(top_k=K, norm_topk_prob=True, weights_in_logits_dtype=False))
    expect = torch.softmax(logits.gather(1, idx), -1)  # Mixtral's published formulation: top-k, then softmax
    assert w.dtype == torch.float32
    assert torch.allclose(w, expect, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_sigmoid_group_topk(K, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 16, generator=g)
    bias = torch.randn(16, generator=g) * 0.1
    cfg = RoutingConfig(top_k=K, scoring="sigmoid_group_topk", n_group=4, topk_group=2, norm_topk_prob=True)
    w, idx = route(logits, cfg, bias)
    assert torch.allclose(w.sum(-1), torch.ones(3), atol=1e-5)
    for t in range(3):
        groups = {int(i) // 4 for i in idx[t]}
        assert len(groups) <= 2  # experts come from at most topk_group groups


class Loaded:
    def __init__(self, key, nbytes):
        self.key = key
        self.stored_nbytes = nbytes


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 7)), min_size=1, max_size=80),
    st.integers(1, 6),
    st.booleans(),
)
def test_cache_never_exceeds_budget_and_evicts_lru(accesses, capacity, prefetch):
    size = 100
    peak = [0]
    lock = threading.Lock()
    cache = ExpertCache(load=lambda l, e: Loaded((l, e), size), nbytes_of=lambda l: size, budget_bytes=capacity * size)
    model_lru: list = []  # most recent last
    for i, key in enumerate(accesses):
        if prefetch and i + 1 < len(accesses):
            cache.prefetch([accesses[i + 1]])
        with cache.use(key) as v:
            assert v.key == key
            with lock:
                peak[0] = max(peak[0], cache.used_bytes)
        cache.wait_idle()
        assert cache.used_bytes <= capacity * size
        if not prefetch:
            if key in model_lru:
                model_lru.remove(key)
            model_lru.append(key)
            model_lru = model_lru[-capacity:]
            assert cache.resident_keys == set(model_lru)
    assert peak[0] <= capacity * size
    s = cache.stats.snapshot()
    assert s["hits"] + s["misses"] == len(accesses)
    cache.close()


def test_pinned_experts_are_not_evicted():
    cache = ExpertCache(load=lambda l, e: Loaded((l, e), 10), nbytes_of=lambda l: 10, budget_bytes=20)
    a = cache.acquire((0, 0))
    cache.acquire((0, 1))
    cache.release((0, 1))
    cache.acquire((0, 2))  # must evict (0, 1), not the pinned (0, 0)
    assert (0, 0) in cache and (0, 1) not in cache
    assert a.key == (0, 0)
    cache.close()


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["lru", "lfu", "stale"]),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), min_size=1, max_size=60),
    st.integers(2, 6),
)
def test_every_policy_keeps_the_budget_and_never_evicts_pinned(policy, accesses, capacity):
    size = 10
    cache = ExpertCache(load=lambda l, e: Loaded((l, e), size), nbytes_of=lambda l: size,
                        budget_bytes=capacity * size, policy=policy)
    pinned = cache.acquire((9, 9))  # held for the whole run
    for key in accesses:
        with cache.use(key) as v:
            assert v.key == key and (9, 9) in cache
        assert cache.used_bytes <= capacity * size
    assert pinned.key == (9, 9)
    cache.release((9, 9))
    cache.close()


def test_stale_evicts_the_layer_just_run_and_replay_agrees_with_the_cache():
    from moepage.paging.policy import StalePolicy
    from moepage.paging.trace import replay

    p = StalePolicy()
    for key in [(0, 1), (1, 1), (2, 1), (0, 2)]:
        p.insert(key)
    # layer 0 is running: the layer before it (2) goes first, then 1, then layer 0's own (the one used less first)
    p.touch((0, 2))
    assert list(p.victims()) == [(2, 1), (1, 1), (0, 1), (0, 2)]
    # a loop over more experts than fit: LRU never hits, stale keeps a fixed subset and hits on it every pass
    loop = [(layer, 0) for layer in range(6)] * 10
    assert replay(loop, "lru", 4).hits == 0
    assert replay(loop, "stale", 4).hits >= 9 * 3 and replay(loop, "stale", 5).hits > replay(loop, "stale", 4).hits
    assert replay(loop, "lru", 6).hits == 54 and replay(loop, "stale", 6).hits == 54


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(-8, 8), min_size=1, max_size=300), st.sampled_from([torch.bfloat16, torch.float16]))
def test_greedy_on_model_dtype_logits_picks_the_float32_argmax(values, dtype):
    """Greedy sampling takes argmax of the model's bf16/f16 logits without widening them: the same token as argmax
    of the float32 logits, the first of tied maxima included (few distinct values, so ties are common)."""
    from moepage.engine.sampling import Sampler, SamplingParams

    raw = (torch.tensor(values, dtype=torch.float32) / 4).to(dtype)
    choice = Sampler(SamplingParams(max_tokens=1, temperature=0), [0], raw.shape[0])(raw)
    assert choice.token == int(torch.argmax(raw.float()))


def test_queued_wrong_guesses_are_withdrawn_and_their_bytes_returned():
    """cancel_prefetches: guesses still queued behind a running read leave the queue and the budget; a running
    read and guesses the routing kept stay; an expert whose guess was withdrawn still pages in when asked."""
    started, release = threading.Event(), threading.Event()

    def load(layer, e):
        if (layer, e) == (1, 0):
            started.set()
            release.wait(5)
        return Loaded((layer, e), 10)

    cache = ExpertCache(load=load, nbytes_of=lambda l: 10, budget_bytes=100, workers=1)
    assert cache.prefetch([(1, 0), (1, 1), (1, 2), (1, 3), (2, 7)], withdrawable=True) == 5
    assert cache.prefetch([(1, 4)]) == 1  # a layer's own miss (not a guess): never withdrawn
    assert started.wait(5)  # (1, 0) is being read; the rest wait in the one-thread queue
    assert cache.cancel_prefetches(1, keep={3}) == 2  # (1, 1) and (1, 2): queued and not picked
    assert cache.used_bytes == 40 and cache.stats.prefetch_cancelled == 2
    release.set()
    cache.wait_idle()
    assert cache.resident_keys == {(1, 0), (1, 3), (1, 4), (2, 7)}
    with cache.use((1, 1)) as v:
        assert v.key == (1, 1)
    assert cache.cancel_prefetches(1, keep=set()) == 0  # nothing queued any more
    cache.close()


@dataclass
class Slotted:
    key: tuple
    buffer: torch.Tensor


def test_evicted_slots_are_reused_by_the_next_reads_within_the_budget():
    """A value with a `buffer` of the reserved size gives it back on eviction; the next read gets it (no fresh
    pages), and spare slots count against the budget until taken."""
    size, given = 64, []

    def load(layer, e, buffer=None):
        given.append(buffer)
        return Slotted((layer, e), torch.empty(size, dtype=torch.uint8) if buffer is None else buffer)

    cache = ExpertCache(load=load, nbytes_of=lambda l: size, budget_bytes=3 * size)
    slots = set()
    for i in range(12):
        with cache.use((0, i)) as v:
            assert v.key == (0, i)
            slots.add(v.buffer.data_ptr())
        assert cache.used_bytes <= 3 * size
    assert given[:3] == [None] * 3 and all(b is not None for b in given[3:])
    assert len(slots) == 3  # three slots served twelve experts
    cache.resize(2 * size)  # shrinking gives back one slot: one eviction, not all of them
    assert cache.used_bytes == 2 * size and len(cache.resident_keys) == 2
    cache.close()
