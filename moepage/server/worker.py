"""One engine thread behind a bounded FIFO queue, generating up to --parallel requests at once; results flow back to
the event loop per job. A queued job cancelled before it runs (its client left) gives its queue slot back at once.

The thread's loop, under the engine's lock one iteration at a time: admit queued jobs into free sequence slots,
run one prefill chunk of the oldest sequence still prefilling (so a newcomer's long prompt delays the others by
one chunk at a time, not by its whole prefill), then one decode step for every sequence past its prefill
(engine/batch_step.py: each expert read once for all of them). A step's outputs are handed to each job's queue on
the event loop without waiting for its client, so a client that does not read never stalls the others."""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from moepage.engine.batch_step import decode_step
from moepage.engine.engine import Engine, StepOutput
from moepage.engine.sampling import SamplingParams
from moepage.engine.sequence import Sequence, settle

log = logging.getLogger("moepage.server")


class QueueFull(Exception):
    pass


_DONE = object()


@dataclass
class JobTiming:
    submitted: float
    started: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    results: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    timing: JobTiming = field(default_factory=lambda: JobTiming(time.perf_counter()))
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens the engine re-used from its prompt cache (known at the first step)
    state: str = "queued"  # queued -> running -> done, or queued -> withdrawn (set under the worker's lock)
    on_cancel: Callable[["Job"], None] | None = None
    seq: Sequence | None = None  # while running

    def cancel(self):
        self.cancel_event.set()
        if self.on_cancel is not None:
            self.on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def _push(self, item):
        try:
            self.loop.call_soon_threadsafe(self.results.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            self.cancel_event.set()

    async def steps(self):
        """Async iterator of StepOutput; re-raises the engine's exception in the caller."""
        while True:
            item = await self.results.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class EngineWorker:
    def __init__(self, engine: Engine, max_queue: int, on_finished=None):
        self.engine = engine
        self.max_queue = max_queue
        self.parallel = len(engine.slots)  # sequences generated at once (EngineConfig.parallel)
        self.on_finished = on_finished  # callable(job), e.g. metrics
        self._jobs: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # admitted, oldest first (the engine thread's own list)
        self._cond = threading.Condition()
        self.waiting = 0
        self.running = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moepage-engine", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 2.0):
        """Cancel every job (queued and running) and wait up to timeout for the running ones to notice."""
        self._stop.set()
        with self._cond:
            queued, current = list(self._jobs), list(self._active)
            self._cond.notify_all()
        for job in queued + current:
            job.cancel()
        self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        job = Job(prompt_ids, params, asyncio.get_running_loop(), on_cancel=self._withdraw)
        with self._cond:
            if self.waiting >= self.max_queue and self.running + self.waiting >= self.parallel:
                raise QueueFull(f"{self.waiting} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting += 1
            self._jobs.append(job)
            self._cond.notify()
        return job

    def _withdraw(self, job: Job):
        """A queued job whose request went away: out of the queue now, not when the worker reaches it."""
        with self._cond:
            if job.state != "queued":
                return
            job.state = "withdrawn"
            self._jobs.remove(job)
            self.waiting -= 1
        job.finish_reason = "cancelled"
        job.timing.finished = time.perf_counter()
        job._push(_DONE)
        self._report(job)

    def _run(self):
        while True:
            newcomers = []
            with self._cond:
                while not self._jobs and not self._active and not self._stop.is_set() and not self._settling():
                    self._cond.wait()
                if self._stop.is_set():
                    break
                while self._jobs and len(self._active) + len(newcomers) < self.parallel:
                    job = self._jobs.popleft()
                    job.state = "running"
                    self.waiting -= 1
                    self.running += 1
                    newcomers.append(job)
            with self.engine.lock:
                for job in newcomers:
                    self._admit(job)
                if self._active:
                    self._iterate()
                else:
                    self._settle()
        for job in list(self._active):
            self._finish(job)

    def _settling(self) -> bool:
        """Idle with a finished reply to prefill into its slot's exact state (engine/sequence.py settle)."""
        return any(s.settle_ids is not None and not s.busy for s in self.engine.slots)

    def _settle(self):
        """One chunk of that idle work; a queued request waits at most for this chunk."""
        try:
            settle(self.engine)
        except Exception as exc:  # the slot's exact prefix is still true; its reply is simply not re-used
            log.warning("settling a finished reply failed: %s: %s", type(exc).__name__, exc)

    def _admit(self, job: Job):
        job.timing.started = time.perf_counter()
        self._active.append(job)
        if job.cancelled:
            return self._finish(job)
        try:
            if self.engine.secretary is not None:
                self.engine.ask_secretary(job.prompt_ids)
            job.seq = self.engine.start(job.prompt_ids, job.params)
        except Exception as exc:
            self._fail([job], exc)

    def _iterate(self):
        """One prefill chunk (the oldest sequence still prefilling), then one decode step for all the others."""
        for job in [j for j in self._active if j.cancelled]:
            self._finish(job)
        prefilling = next((j for j in self._active if j.seq.prefilling), None)
        if prefilling is not None:
            try:
                others = any(j.seq.pending is not None for j in self._active if j is not prefilling)
                if prefilling.seq.prefill_chunk(alone=not others):
                    self._emit(prefilling)
            except Exception as exc:
                self._fail([prefilling], exc)
        ready = [j for j in self._active if j.seq.pending is not None and j is not prefilling]
        if not ready:
            return
        try:
            if len(ready) == 1:  # exactly the single-sequence step
                s = ready[0].seq
                logits = [self.engine.model.forward(torch.tensor([s.pending]), s.slot.kv)[-1]]
            else:
                logits = decode_step(self.engine.model, [j.seq.pending for j in ready], [j.seq.slot.kv for j in ready])
        except Exception as exc:
            return self._fail(ready, exc)
        for job, row in zip(ready, logits):
            job.seq.feed(row)
            try:
                self._emit(job)
            except Exception as exc:
                self._fail([job], exc)

    def _emit(self, job: Job):
        step = job.seq.sample()
        if not job.timing.token_times:
            job.cached_tokens = job.seq.stats.cached_prompt_tokens
        job.timing.token_times.append(time.perf_counter())
        if step.finish_reason:
            job.finish_reason = step.finish_reason
        job._push(step)
        if job.seq.finished:
            self._finish(job)

    def _fail(self, jobs: list[Job], exc: Exception):  # reported to the request; the worker keeps serving
        log.warning("generation failed: %s: %s", type(exc).__name__, exc)
        for job in jobs:
            job._push(exc)
            self._finish(job)

    def _finish(self, job: Job):
        if job not in self._active:
            return
        self._active.remove(job)
        if job.seq is not None:
            job.seq.finish()
            if self.engine.secretary is not None:
                self.engine.secretary.end_request()
        job.timing.finished = time.perf_counter()
        if job.cancelled and job.finish_reason is None:
            job.finish_reason = "cancelled"
        job._push(_DONE)
        with self._cond:
            job.state = "done"
            self.running -= 1
        self._report(job)

    def _report(self, job: Job):
        if self.on_finished is not None:
            try:
                self.on_finished(job)
            except Exception:
                log.exception("metrics callback failed")


__all__ = ["EngineWorker", "Job", "QueueFull", "StepOutput"]
