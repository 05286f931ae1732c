"""The secretary: hashed n-gram domain classifier + prefetch of the domain's hottest experts."""
from __future__ import annotations

import json
import random
import threading

import pytest

from moepage.paging.cache import ExpertCache
from moepage.paging.secretary import Secretary, experts_budget_from_bytes, ngram_buckets, ngram_table

CODE_WORDS = ["def", "return", "import", "self", "for", "in", "range(n):", "if", "x", "==", "None:", "class",
              "print(x)", "lambda", "yield", "[i]", "+=", "1", "try:", "except", "ValueError:", "dict()", "len(xs)"]
PROSE_WORDS = ["the", "morning", "was", "quiet", "and", "she", "walked", "along", "river", "thinking", "of",
               "her", "mother", "who", "had", "lived", "by", "sea", "many", "years", "ago", "with", "a", "garden"]
E = 8  # experts per layer in the synthetic profile
LAYERS = [0, 1, 2]
HOT = {"code": [1, 2], "prose": [5, 6]}


def texts(words, n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(40)) for _ in range(n)]


def synthetic_profile(train: dict[str, list[str]]) -> dict:
    domains = {}
    for name, hot in HOT.items():
        count = [[(100 if e in hot else 3) + layer for e in range(E)] for layer in LAYERS]
        domains[name] = {"tokens": 1000, "count": count}
    return {
        "format": "moepage-profile", "version": 1,
        "model": {"name": "toy", "family": "qwen3_moe", "num_experts": E, "top_k": 2, "moe_layers": LAYERS},
        "domains": domains,
        "secretary": {"buckets": 1 << 16, "ngrams": {n: ngram_table(t) for n, t in train.items()}},
    }


@pytest.fixture(scope="module")
def secretary():
    train = {"code": texts(CODE_WORDS, 20, 1), "prose": texts(PROSE_WORDS, 20, 2)}
    return Secretary.from_profile(synthetic_profile(train))


def test_ngrams_are_stable_and_hashed():
    a = ngram_buckets("def f(x): return x")
    assert a == ngram_buckets("def f(x): return x") and all(0 <= b < 1 << 16 for b in a)
    assert sum(a.values()) > 10


def test_classifies_held_out_planted_domains(secretary):
    for text in texts(CODE_WORDS, 10, 11):
        assert secretary.predict(text)[0] == "code"
    for text in texts(PROSE_WORDS, 10, 12):
        assert secretary.predict(text)[0] == "prose"
    domain, confidence = secretary.predict("for i in range(n): print(x)")
    assert domain == "code" and 0.5 < confidence <= 1.0
    probs = secretary.scores("she walked along the river")
    assert abs(sum(probs.values()) - 1) < 1e-9 and probs["prose"] > 0.9


def test_learns_from_texts_instead_of_stored_counts():
    empty = synthetic_profile({})
    with pytest.raises(ValueError, match="no n-gram counts"):
        Secretary.from_profile(empty)
    sec = Secretary.from_profile(empty, texts={"code": texts(CODE_WORDS, 5, 3), "prose": texts(PROSE_WORDS, 5, 4)})
    assert sec.predict("import x ; return None")[0] == "code"


def test_experts_for_ranks_hottest_in_layer_order(secretary):
    keys = secretary.experts_for("code", 6)
    assert sorted(keys) == [(layer, e) for layer in LAYERS for e in HOT["code"]]
    assert keys == sorted(keys, key=lambda k: k[0])  # early layers first
    assert len(secretary.experts_for("prose", 100)) == E * len(LAYERS)  # budget larger than the model
    assert secretary.experts_for("prose", 0) == []
    with pytest.raises(ValueError, match="unknown domain 'math'"):
        secretary.experts_for("math", 4)


def test_from_profile_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="profile file not found"):
        Secretary.from_profile(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a moepage profile"):
        Secretary.from_profile(str(bad))


class FakeExpert:
    stored_nbytes = 100


def make_cache(budget_experts: int):
    loaded = []
    lock = threading.Lock()

    def load(layer, expert):
        with lock:
            loaded.append((layer, expert))
        return FakeExpert()

    return ExpertCache(load=load, nbytes_of=lambda layer: 100, budget_bytes=100 * budget_experts, workers=2), loaded


def test_prefetches_land_in_the_cache_and_are_counted(secretary):
    cache, loaded = make_cache(budget_experts=16)
    try:
        domain, conf, keys = secretary.prefetch(cache, "def f(x): return x", budget=6)
        cache.wait_idle()
        assert domain == "code" and len(keys) == 6
        assert set(keys) <= cache.resident_keys and sorted(loaded) == sorted(keys)
        for key in keys[:4]:  # the model then uses four of the six
            with cache.use(key):
                pass
        with cache.use((0, 7)):  # and one the secretary did not predict
            pass
        snap = secretary.snapshot()
        assert snap["prefetch_requested"] >= 6 and snap["prefetch_issued"] >= 6
        assert snap["prefetch_used"] >= 4 and snap["predictions"]["code"] >= 1
        assert cache.stats.hits >= 4 and cache.stats.prefetch_used == 4
    finally:
        cache.close()


def test_low_confidence_skips_prefetch():
    train = {"code": texts(CODE_WORDS, 5, 1), "prose": texts(PROSE_WORDS, 5, 2)}
    sec = Secretary.from_profile(synthetic_profile(train), min_confidence=1.01)
    cache, loaded = make_cache(budget_experts=8)
    try:
        _, _, keys = sec.prefetch(cache, "def f(x): return x", budget=4)
        cache.wait_idle()
        assert keys == [] and loaded == [] and sec.snapshot()["skipped_low_confidence"] == 1
    finally:
        cache.close()


def test_budget_from_bytes():
    assert experts_budget_from_bytes(1000, 100, 0.5) == 5
    with pytest.raises(ValueError):
        experts_budget_from_bytes(1000, 0)


def test_repeated_prefetch_counts_only_fresh_reads(secretary):
    """A second request for the same domain finds its experts resident: nothing issued, nothing counted as used."""
    sec = Secretary(list(secretary.domains.values()))
    cache, loaded = make_cache(budget_experts=16)
    try:
        _, _, keys = sec.prefetch(cache, "def f(x): return x", budget=4)
        cache.wait_idle()
        for key in keys:
            with cache.use(key):
                pass
        sec.end_request()
        _, _, again = sec.prefetch(cache, "def g(y): return y", budget=4)
        cache.wait_idle()
        for key in again:
            with cache.use(key):
                pass
        snap = sec.snapshot()
        assert again == keys
        assert (snap["prefetch_requested"], snap["prefetch_issued"], snap["prefetch_used"]) == (8, 4, 4)
        assert snap["prefetch_precision"] == 1.0
    finally:
        cache.close()


def test_engine_secretary_on_the_demo_model_prefetches_and_keeps_tokens():
    """The shipped demo model and its profile: a code prompt is classified as code, its experts are read before
    prefill and used, /metrics reports it, and the tokens equal a run without the secretary."""
    import os

    from moepage.demo import SHIPPED_DIR
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.moe import PreparedExpert
    from moepage.engine.sampling import SamplingParams
    from moepage.server.metrics import EngineCollector

    profile = os.path.join(SHIPPED_DIR, "profile.json")
    text = "import os\n\ndef read_lines(path):\n    with open(path) as f:\n        return f.read().splitlines()\n"
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens = {}
    for on in (False, True):
        probe = Engine.load(EngineConfig(str(SHIPPED_DIR)))
        a = probe.args
        each = PreparedExpert.nbytes_for(a.hidden_size, a.moe_intermediate_size, probe.model.dtype)
        probe.close()
        engine = Engine.load(EngineConfig(str(SHIPPED_DIR), expert_cache_bytes=6 * each,
                                          secretary=profile if on else None))
        tokens[on] = [s.token for s in engine.generate(engine.tokenizer.encode(text), params)]
        if on:
            snap = engine.secretary.snapshot()
            assert snap["predictions"] == {"code": 1} and snap["prefetch_issued"] > 0
            assert 0 < snap["prefetch_used"] <= snap["prefetch_issued"]

            class Worker:
                running = waiting = 0

            names = {m.name for m in EngineCollector(engine, Worker(), "demo").collect()}
            assert {"moepage_secretary_predictions", "moepage_secretary_prefetch_used"} <= names
        engine.close()
    assert tokens[True] == tokens[False]
