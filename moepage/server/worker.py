"""One engine worker thread behind a bounded FIFO queue; results flow back to the event loop per job. A queued job
cancelled before it runs (its client left) gives its queue slot back at once."""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from moepage.engine.engine import Engine, StepOutput
from moepage.engine.sampling import SamplingParams

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
        self.on_finished = on_finished  # callable(job), e.g. metrics
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self.waiting = 0
        self.running = 0
        self._current: Job | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moepage-engine", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 2.0):
        """Cancel every job (queued and running) and wait up to timeout for the running one to notice."""
        self._stop.set()
        with self._cond:
            queued, current = list(self._jobs), self._current
            self._cond.notify_all()
        for job in queued:
            job.cancel()
        if current is not None:
            current.cancel()
        self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        job = Job(prompt_ids, params, asyncio.get_running_loop(), on_cancel=self._withdraw)
        with self._cond:
            if self.waiting >= self.max_queue and (self.running or self.waiting):
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
            with self._cond:
                while not self._jobs and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    break
                job = self._jobs.popleft()
                job.state = "running"
                self.waiting -= 1
                self.running += 1
                self._current = job
            try:
                self._execute(job)
            finally:
                with self._cond:
                    job.state = "done"
                    self.running -= 1
                    self._current = None

    def _execute(self, job: Job):
        job.timing.started = time.perf_counter()
        gen = None
        try:
            if not job.cancelled:
                gen = self.engine.generate(job.prompt_ids, job.params, cancelled=job.cancel_event.is_set)
                for step in gen:
                    if not job.timing.token_times:
                        job.cached_tokens = self.engine.last_stats.cached_prompt_tokens
                    job.timing.token_times.append(time.perf_counter())
                    if step.finish_reason:
                        job.finish_reason = step.finish_reason
                    job._push(step)
                    if job.cancelled:
                        break
        except Exception as exc:  # reported to the request; the worker keeps serving
            log.warning("generation failed: %s: %s", type(exc).__name__, exc)
            job._push(exc)
        finally:
            if gen is not None:
                gen.close()
            job.timing.finished = time.perf_counter()
            if job.cancelled and job.finish_reason is None:
                job.finish_reason = "cancelled"
            job._push(_DONE)
            self._report(job)

    def _report(self, job: Job):
        if self.on_finished is not None:
            try:
                self.on_finished(job)
            except Exception:
                log.exception("metrics callback failed")


__all__ = ["EngineWorker", "Job", "QueueFull", "StepOutput"]
