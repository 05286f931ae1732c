"""The secretary: guess a request's domain from its text and prefetch that domain's hottest experts.

A multinomial naive Bayes over hashed character n-grams, learned from the calibration texts of a
`moepage profile` run (the profile stores each domain's n-gram bucket counts, so the texts need not be
kept), plus the profile's per-domain expert heat. Cheap enough to run on every request before prefill.

Use:
    sec = Secretary.from_profile("profile.json")
    domain, confidence = sec.predict(prompt_text)
    keys = sec.experts_for(domain, budget=64)        # [(layer, expert)], hottest first within each layer
    sec.prefetch(cache, prompt_text, budget=64)      # predict + cache.prefetch + counters, before prefill
    sec.end_request()                                # after generation: stop attributing accesses
    sec.snapshot()                                   # counters for /metrics
"""
from __future__ import annotations

import json
import math
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

NGRAM_BUCKETS = 1 << 16
NGRAM_SIZES = (3, 4)
MAX_TEXT_CHARS = 20_000  # the classifier reads at most this much of a prompt (its start and end)

Key = tuple[int, int]  # (layer, expert)


def ngram_buckets(text: str, buckets: int = NGRAM_BUCKETS) -> Counter:
    """Hashed character n-grams of each whitespace-separated word padded with spaces -> {bucket: count}.

    crc32 keeps the hashing stable across processes (Python's hash() is salted).
    """
    if len(text) > MAX_TEXT_CHARS:
        half = MAX_TEXT_CHARS // 2
        text = text[:half] + " " + text[-half:]
    counts: Counter = Counter()
    for word in text.lower().split():
        padded = f" {word} "
        for n in NGRAM_SIZES:
            for i in range(max(1, len(padded) - n + 1)):
                counts[zlib.crc32(padded[i : i + n].encode("utf-8", "replace")) % buckets] += 1
    return counts


@dataclass
class DomainModel:
    """One domain: its n-gram bucket counts and its experts' heat (selection share) per layer."""

    name: str
    ngram_counts: dict[int, int]
    heat: dict[int, list[float]]  # layer -> [E] share of that layer's selections that went to each expert
    prior_tokens: int = 1
    total_ngrams: int = field(init=False)

    def __post_init__(self):
        self.total_ngrams = sum(self.ngram_counts.values())


@dataclass
class SecretaryCounters:
    requests: int = 0
    predictions: Counter = field(default_factory=Counter)  # domain -> times predicted
    skipped_low_confidence: int = 0
    prefetch_requested: int = 0  # keys the secretary asked the cache for
    prefetch_issued: int = 0  # of those, reads the cache actually started (not already resident)
    prefetch_used: int = 0  # of the issued reads, experts the model then used during the same request
    last_domain: str | None = None
    last_confidence: float = 0.0


class Secretary:
    def __init__(self, domains: list[DomainModel], buckets: int = NGRAM_BUCKETS, min_confidence: float = 0.0,
                 smoothing: float = 1.0):
        if not domains:
            raise ValueError("the secretary needs at least one domain")
        self.domains = {d.name: d for d in domains}
        self.buckets = buckets
        self.min_confidence = min_confidence
        self.smoothing = smoothing
        self.counters = SecretaryCounters()
        self._lock = threading.Lock()
        self._outstanding: set[Key] = set()  # prefetched by us, not yet used by the model
        self._watched: set[int] = set()  # id() of caches whose accesses we observe

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_profile(cls, profile: dict | str, texts: dict[str, list[str]] | None = None, **kwargs) -> "Secretary":
        """From a profile (dict or JSON path). `texts` ({domain: [text]}) overrides the stored n-gram counts."""
        if isinstance(profile, str):
            try:
                with open(profile) as f:
                    profile = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"{profile}: profile file not found (run `moepage profile` first)") from None
        if profile.get("format") != "moepage-profile":
            raise ValueError("not a moepage profile (missing \"format\": \"moepage-profile\")")
        layers = profile["model"]["moe_layers"]
        stored = profile.get("secretary", {})
        buckets = int(stored.get("buckets", NGRAM_BUCKETS))
        models = []
        for name, d in profile["domains"].items():
            if texts is not None and name in texts:
                grams: Counter = Counter()
                for t in texts[name]:
                    grams.update(ngram_buckets(t, buckets))
                counts = dict(grams)
            else:
                counts = {int(b): int(c) for b, c in stored.get("ngrams", {}).get(name, {}).items()}
            heat = {}
            for i, layer in enumerate(layers):
                row = d["count"][i]
                total = sum(row) or 1
                heat[int(layer)] = [c / total for c in row]
            models.append(DomainModel(name, counts, heat, prior_tokens=max(1, int(d.get("tokens", 1)))))
        if not any(m.total_ngrams for m in models):
            raise ValueError("the profile has no n-gram counts for any domain; pass texts= to learn from")
        return cls(models, buckets=buckets, **kwargs)

    # ---- classification -----------------------------------------------------------------------
    def scores(self, text: str) -> dict[str, float]:
        """Posterior probability of each domain (uniform prior) given the text."""
        grams = ngram_buckets(text, self.buckets)
        log_like = {}
        for name, d in self.domains.items():
            denom = math.log(d.total_ngrams + self.smoothing * self.buckets)
            log_like[name] = sum(c * (math.log(d.ngram_counts.get(b, 0) + self.smoothing) - denom)
                                 for b, c in grams.items())
        top = max(log_like.values())
        exp = {k: math.exp(v - top) for k, v in log_like.items()}
        z = sum(exp.values())
        return {k: v / z for k, v in exp.items()}

    def predict(self, text: str) -> tuple[str, float]:
        """(domain, confidence in [0, 1]); ties break by domain name so the answer is deterministic."""
        probs = self.scores(text)
        domain = max(sorted(probs), key=lambda k: probs[k])
        return domain, probs[domain]

    # ---- what to prefetch ---------------------------------------------------------------------
    def experts_for(self, domain: str, budget: int) -> list[Key]:
        """The domain's `budget` hottest (layer, expert) pairs, ordered by layer, hottest first within a layer.

        Heat is the share of a layer's selections an expert received, so layers compare on one scale.
        """
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; the profile has: {', '.join(sorted(self.domains))}")
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        heat = self.domains[domain].heat
        ranked = sorted(((h, layer, e) for layer, row in heat.items() for e, h in enumerate(row) if h > 0),
                        key=lambda t: (-t[0], t[1], t[2]))[:budget]
        return [(layer, e) for _, layer, e in sorted(ranked, key=lambda t: (t[1], -t[0], t[2]))]

    # ---- acting on a cache --------------------------------------------------------------------
    def prefetch(self, cache, text: str, budget: int) -> tuple[str, float, list[Key]]:
        """Predict the domain of `text` and ask `cache` (an ExpertCache) to read its hottest experts.

        Returns (domain, confidence, keys asked for); no keys when confidence < min_confidence.
        """
        domain, confidence = self.predict(text)
        with self._lock:
            c = self.counters
            c.requests += 1
            c.predictions[domain] += 1
            c.last_domain, c.last_confidence = domain, confidence
            if confidence < self.min_confidence:
                c.skipped_low_confidence += 1
                return domain, confidence, []
        keys = self.experts_for(domain, budget)
        self._watch(cache)
        fresh = [k for k in keys if k not in cache]  # a key already resident is no prefetch of ours
        issued = cache.prefetch(fresh)
        with self._lock:
            self._outstanding = set(fresh)
            self.counters.prefetch_requested += len(keys)
            self.counters.prefetch_issued += issued
        return domain, confidence, keys

    def end_request(self):
        """Stop attributing accesses to the last request's prefetch (what it read and nobody used is waste)."""
        with self._lock:
            self._outstanding = set()

    def _watch(self, cache):
        if id(cache) in self._watched:
            return
        self._watched.add(id(cache))
        cache.on_access.append(self._on_access)

    def _on_access(self, key: Key, hit: bool):
        with self._lock:
            if key in self._outstanding:
                self._outstanding.discard(key)
                self.counters.prefetch_used += 1

    def snapshot(self) -> dict:
        """Counters for /metrics: requests, predictions per domain, prefetch requested/issued/used, precision."""
        with self._lock:
            c = self.counters
            return {
                "requests": c.requests,
                "predictions": dict(sorted(c.predictions.items())),
                "skipped_low_confidence": c.skipped_low_confidence,
                "prefetch_requested": c.prefetch_requested,
                "prefetch_issued": c.prefetch_issued,
                "prefetch_used": c.prefetch_used,
                "prefetch_precision": c.prefetch_used / c.prefetch_issued if c.prefetch_issued else 0.0,
                "last_domain": c.last_domain,
                "last_confidence": c.last_confidence,
            }


def experts_budget_from_bytes(cache_budget_bytes: int, expert_nbytes: int, fraction: float = 0.5) -> int:
    """How many experts a prefetch may ask for: `fraction` of what the cache holds (leave room for LRU)."""
    if expert_nbytes <= 0:
        raise ValueError("expert_nbytes must be positive")
    return max(0, int(cache_budget_bytes * fraction) // expert_nbytes)


def ngram_table(texts: Iterable[str], buckets: int = NGRAM_BUCKETS) -> dict[str, int]:
    """{bucket (as str, for JSON): count} over texts; what a profile stores per domain."""
    total: Counter = Counter()
    for t in texts:
        total.update(ngram_buckets(t, buckets))
    return {str(b): total[b] for b in sorted(total)}
