"""Prometheus metrics: a custom collector over the engine's cache stats plus per-request latency histograms."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from moepage.engine.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineCollector(Collector):
    """Reads engine.cache.stats, engine.plan and the worker's queue on every scrape."""

    def __init__(self, engine: Engine, worker, model_id: str):
        self.engine = engine
        self.worker = worker
        self.model_id = model_id

    def collect(self):
        cache = self.engine.cache
        s = cache.stats.snapshot()
        plan = self.engine.plan
        labels, values = ["model"], [self.model_id]

        def counter(name, doc, value):
            m = CounterMetricFamily(name, doc, labels=labels)
            m.add_metric(values, value)
            return m

        def gauge(name, doc, value):
            m = GaugeMetricFamily(name, doc, labels=labels)
            m.add_metric(values, value)
            return m

        yield counter("moepage_expert_cache_hits", "Expert lookups served from the expert cache", s["hits"])
        yield counter("moepage_expert_cache_misses", "Expert lookups that had to page in from disk", s["misses"])
        yield counter("moepage_expert_cache_evictions", "Experts evicted from the expert cache", s["evictions"])
        yield counter("moepage_expert_read_bytes", "Bytes of expert weights read from the source", s["bytes_read"])
        yield counter("moepage_prefetch_issued", "Expert prefetches started", s["prefetch_issued"])
        yield counter("moepage_prefetch_used", "Prefetched experts that were used", s["prefetch_used"])
        yield counter("moepage_prefetch_wasted", "Prefetched experts evicted unused", s["prefetch_wasted"])
        yield counter("moepage_prefetch_dropped", "Prefetches skipped for lack of budget", s["prefetch_dropped"])
        yield counter("moepage_prefetch_cancelled", "Queued pre-gating guesses withdrawn once the real routing was known",
                      s["prefetch_cancelled"])
        yield counter("moepage_pregate_predicted_experts", "Experts the pre-gating router guess named for the next layer",
                      s["guess_predicted"])
        yield counter("moepage_pregate_correct_experts", "Pre-gating guesses the next layer then used", s["guess_correct"])
        yield counter("moepage_pregate_needed_experts", "Experts used by layers that had a pre-gating guess",
                      s["guess_needed"])

        hist = cache.stats.page_in
        with cache.stats.lock:
            counts, total = list(hist.counts), hist.total
        source = self.engine.ckpt.kind if hasattr(self.engine, "ckpt") else "unknown"  # hf | split | gguf
        cumulative, buckets = 0, []
        for bound, n in zip(list(hist.buckets) + [float("inf")], counts):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        h = HistogramMetricFamily("moepage_expert_page_in_seconds", "Time to read and prepare one expert",
                                  labels=["model", "source"])
        h.add_metric([self.model_id, source], buckets, total)
        yield h

        yield gauge("moepage_memory_budget_bytes", "The --memory-budget (0: unlimited)", plan.budget or 0)
        yield gauge("moepage_resident_weights_bytes", "Bytes of always-resident weights", plan.resident_bytes)
        yield gauge("moepage_kv_cache_bytes", "Bytes of the preallocated KV cache", plan.kv_bytes)
        yield gauge("moepage_expert_cache_capacity_bytes", "Byte budget of the expert cache", plan.expert_cache_bytes)
        yield gauge("moepage_expert_cache_used_bytes", "Bytes held by the expert cache now", cache.used_bytes)
        yield gauge("moepage_expert_cache_hit_ratio", "Expert cache hits / lookups since start", s["hit_rate"])
        yield gauge("moepage_requests_running", "Requests generating now", self.worker.running)
        yield gauge("moepage_requests_waiting", "Requests queued behind the running one", self.worker.waiting)
        yield gauge("moepage_context_length_tokens", "KV cache length in tokens", self.engine.ctx_size)
        prompt_cache = getattr(self.engine, "prompt_cache", None)
        if prompt_cache is not None:
            p = prompt_cache.snapshot_stats()
            yield counter("moepage_prompt_tokens_reused", "Prompt tokens whose state came from the prompt cache",
                          p["reused_tokens"])
            yield counter("moepage_prompt_tokens_computed", "Prompt tokens prefilled (not found in the prompt cache)",
                          p["computed_tokens"])
            yield counter("moepage_prompt_cache_hits", "Prompts that re-used a cached prefix", p["hits"])
            yield counter("moepage_prompt_cache_evictions", "Cached conversation states evicted", p["evictions"])
            yield gauge("moepage_prompt_cache_entries", "Conversation states held in the prompt cache", p["entries"])
            yield gauge("moepage_prompt_cache_used_bytes", "Bytes of the prompt cache's snapshots", p["bytes"])
            yield gauge("moepage_prompt_cache_capacity_bytes", "Byte budget of the prompt cache", p["capacity_bytes"])
        secretary = getattr(self.engine, "secretary", None)
        if secretary is not None:
            yield from self._secretary(secretary.snapshot(), counter)
        tier = getattr(getattr(self.engine, "ckpt", None), "experts", None)
        if getattr(tier, "tier", None) is not None:  # `serve --lazy`: memory -> disk tier -> Hub
            yield from self._tiers(tier, s["hits"], counter, gauge)

    def _tiers(self, source, memory_hits: int, counter, gauge):
        t = source.stats.snapshot()
        hits = CounterMetricFamily("moepage_expert_tier_hits", "Expert lookups served by each tier (memory: the "
                                   "expert cache; disk: the disk tier; hub: fetched from the Hub)",
                                   labels=["model", "tier"])
        for name, n in (("memory", memory_hits), ("disk", t["disk_hits"]), ("hub", t["hub_fetches"])):
            hits.add_metric([self.model_id, name], n)
        yield hits
        read = CounterMetricFamily("moepage_expert_tier_bytes", "Bytes of experts read from the disk tier and "
                                   "received from the Hub", labels=["model", "tier"])
        for name, n in (("disk", t["disk_bytes"]), ("hub", t["hub_bytes"])):
            read.add_metric([self.model_id, name], n)
        yield read
        yield counter("moepage_hub_fetch_errors", "Expert fetches from the Hub that failed (their requests got 503)",
                      t["hub_errors"])
        yield counter("moepage_disk_tier_evictions", "Expert files the disk tier deleted to stay within its budget",
                      t["evictions"])
        yield gauge("moepage_disk_tier_used_bytes", "Bytes of expert files in the disk tier", source.tier.used_bytes)
        yield gauge("moepage_disk_tier_budget_bytes", "The --disk-budget (0: no limit)", source.tier.budget or 0)
        yield gauge("moepage_disk_tier_experts", "Expert files in the disk tier", len(source.tier))
        cumulative, buckets = 0, []
        for bound, n in zip(list(t["fetch_buckets"]) + [float("inf")], t["fetch_counts"]):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        h = HistogramMetricFamily("moepage_hub_fetch_seconds", "Time to fetch one expert from the Hub",
                                  labels=["model"])
        h.add_metric([self.model_id], buckets, t["fetch_seconds_total"])
        yield h

    def _secretary(self, snap: dict, counter):
        predictions = CounterMetricFamily("moepage_secretary_predictions", "Requests the secretary assigned to each "
                                          "domain", labels=["model", "domain"])
        for domain, n in snap["predictions"].items():
            predictions.add_metric([self.model_id, domain], n)
        yield predictions
        yield counter("moepage_secretary_prefetch_issued", "Expert reads the secretary started before prefill",
                      snap["prefetch_issued"])
        yield counter("moepage_secretary_prefetch_used", "Secretary-prefetched experts the request then used",
                      snap["prefetch_used"])
        yield counter("moepage_secretary_skipped", "Requests below the secretary's confidence threshold",
                      snap["skipped_low_confidence"])


class RequestMetrics:
    """Per-request counters and histograms, registered in the app's own registry."""

    def __init__(self, registry: CollectorRegistry, model_id: str):
        lbl = ["model"]
        self.model_id = model_id
        self.ttft = Histogram("moepage_time_to_first_token_seconds", "Time from arrival to the first token",
                              lbl, buckets=LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("moepage_inter_token_latency_seconds", "Time between consecutive tokens", lbl,
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("moepage_e2e_request_latency_seconds", "Time from arrival to the last token", lbl,
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram("moepage_request_queue_seconds", "Time waiting for the engine", lbl,
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("moepage_prompt_tokens", "Prompt tokens processed", lbl, registry=registry)
        self.generation_tokens = Counter("moepage_generation_tokens", "Tokens generated", lbl, registry=registry)
        self.finished = Counter("moepage_requests_finished", "Generations finished, by finish reason",
                                lbl + ["finish_reason"], registry=registry)
        self.rejected = Counter("moepage_requests_rejected", "Requests refused, by reason", lbl + ["reason"],
                                registry=registry)

    def observe_job(self, job):
        t = job.timing
        m = self.model_id
        if t.started is not None:
            self.queue_time.labels(m).observe(t.started - t.submitted)
        if t.token_times:
            self.ttft.labels(m).observe(t.token_times[0] - t.submitted)
            for a, b in zip(t.token_times, t.token_times[1:]):
                self.itl.labels(m).observe(b - a)
        if t.finished is not None:
            self.e2e.labels(m).observe(t.finished - t.submitted)
        if t.started is not None and not (job.cancelled and not t.token_times):
            self.prompt_tokens.labels(m).inc(len(job.prompt_ids))
        self.generation_tokens.labels(m).inc(len(t.token_times))
        self.finished.labels(m, job.finish_reason or "error").inc()

    def reject(self, reason: str):
        self.rejected.labels(self.model_id, reason).inc()
