"""Shared request plumbing: sampling parameters, context checks, queue admission, collecting a job's steps."""
from __future__ import annotations

import asyncio
import logging

from fastapi import Request

from moepage.engine.engine import Engine, StepOutput
from moepage.engine.kv_cache import ContextOverflow
from moepage.engine.sampling import NonFiniteLogits, SamplingParams
from moepage.engine.tokenizer import RenderLimits
from moepage.paging.pread import CheckpointError, ExpertReadError
from moepage.server.cpu_pool import CpuPool
from moepage.server.errors import APIError, bad_request, context_overflow
from moepage.server.metrics import RequestMetrics
from moepage.server.protocol import SamplingFields
from moepage.server.settings import ServerSettings
from moepage.server.worker import EngineWorker, Job, QueueFull

log = logging.getLogger("moepage.server")


class ClientDisconnected(Exception):
    pass


def engine_error(exc: Exception, what: str) -> APIError:
    """Errors the engine raises on a request's own values as 400s; disk faults while paging as 503s, non-finite
    logits as 500s (anything else is re-raised: an internal error)."""
    if isinstance(exc, ContextOverflow):
        return context_overflow(exc.limit, exc.needed, what)
    if isinstance(exc, (ExpertReadError, CheckpointError)):  # the weights on disk, never the request
        return APIError(503, f"reading the model's weights failed: {exc}", code="expert_read_failed")
    if isinstance(exc, NonFiniteLogits):
        return APIError(500, str(exc), code="non_finite_logits")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    raise exc


class GenerationService:
    def __init__(self, engine: Engine, worker: EngineWorker, metrics: RequestMetrics, settings: ServerSettings,
                 cpu: CpuPool, max_request_bytes: int):
        self.engine = engine
        self.worker = worker
        self.metrics = metrics
        self.settings = settings
        self.cpu = cpu
        # rendered prompts beyond this cannot fit the context: 4 bodies, or 64 characters a context token
        self.render_limits = RenderLimits(seconds=settings.template_timeout_seconds,
                                          max_chars=max(4 * max_request_bytes, 64 * engine.ctx_size),
                                          stopped=cpu.stopping.is_set)

    @property
    def vocab_size(self) -> int:
        return self.engine.args.vocab_size

    def check_model(self, name: str | None):
        if not self.settings.accepts_model(name):
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.settings.model_id}`; "
                                f"see /v1/models", param="model", code="model_not_found")

    def check_n(self, n: int | None):
        if (n or 1) > self.settings.max_n:
            raise bad_request(f"n must be at most {self.settings.max_n} on this server, got {n}", param="n")

    def check_context(self, prompt_ids: list[int], what: str):
        if len(prompt_ids) >= self.engine.ctx_size:
            raise context_overflow(self.engine.ctx_size, len(prompt_ids), what)

    def sampling_params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        choice: int = 0) -> SamplingParams:
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            token = int(key) if key.isascii() and key.isdigit() and len(key) <= 12 else None
            if token is None or token >= self.vocab_size:
                raise bad_request(f"logit_bias keys must be token ids (ASCII digits) in the vocabulary "
                                  f"(0..{self.vocab_size - 1}), got {key[:20]!r}", param="logit_bias")
            bias[token] = float(value)
        stop_ids = list(req.stop_token_ids or [])
        for t in stop_ids:
            if t >= self.vocab_size:
                raise bad_request(f"stop_token_ids: {t} is outside the vocabulary", param="stop_token_ids")
        stops = req.stop_list()
        if any(not s for s in stops):
            raise bad_request("stop strings must not be empty", param="stop")
        if len(stops) > self.settings.max_stop_strings:
            raise bad_request(f"at most {self.settings.max_stop_strings} stop strings are allowed, got {len(stops)}",
                              param="stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > self.settings.max_stop_chars:
            raise bad_request(f"stop strings may be at most {self.settings.max_stop_chars} characters long, got one "
                              f"of {longest}", param="stop")
        seed = req.seed
        if seed is not None and choice:
            seed = (seed + choice) % 2**64
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=seed, stop=stops, stop_token_ids=stop_ids, ignore_eos=bool(req.ignore_eos),
            logprobs=logprobs, logit_bias=bias,
        )
        try:
            params.validate(self.vocab_size)
        except ValueError as e:
            raise bad_request(str(e)) from None
        return params

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        try:
            return self.worker.submit(prompt_ids, params)
        except QueueFull as e:
            self.metrics.reject("queue_full")
            raise APIError(429, f"the server is busy: {e}; retry shortly", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_seconds)}) from None

    async def collect(self, job: Job, request: Request | None) -> list[StepOutput]:
        """All steps of a job; cancels it and raises ClientDisconnected if the client goes away first."""
        steps: list[StepOutput] = []

        async def consume():
            async for step in job.steps():
                steps.append(step)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(request)) if request is not None else None
        try:
            waiters = {consumer} | ({watcher} if watcher else set())
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if consumer not in done:
                job.cancel()
                consumer.cancel()
                raise ClientDisconnected()
            consumer.result()
            return steps
        finally:
            if watcher is not None:
                watcher.cancel()
            if not consumer.done():
                job.cancel()
                consumer.cancel()


async def _wait_disconnect(request: Request, interval: float = 0.1):
    while not await request.is_disconnected():
        await asyncio.sleep(interval)
