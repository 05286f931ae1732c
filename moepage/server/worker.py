"""One engine worker thread behind a bounded FIFO queue; results flow back to the event loop per job."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

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

    def cancel(self):
        self.cancel_event.set()

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
        self.on_finished = on_finished  # callable(job) in the worker thread, e.g. metrics
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moepage-engine", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 5.0):
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        job = Job(prompt_ids, params, asyncio.get_running_loop())
        with self._lock:
            if self.waiting >= self.max_queue and (self.running or self.waiting):
                raise QueueFull(f"{self.waiting} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting += 1
        self._jobs.put(job)
        return job

    def _run(self):
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                break
            with self._lock:
                self.waiting -= 1
                self.running += 1
            try:
                self._execute(job)
            finally:
                with self._lock:
                    self.running -= 1

    def _execute(self, job: Job):
        job.timing.started = time.perf_counter()
        gen = None
        try:
            if not job.cancelled:
                gen = self.engine.generate(job.prompt_ids, job.params, cancelled=job.cancel_event.is_set)
                for step in gen:
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
            if self.on_finished is not None:
                try:
                    self.on_finished(job)
                except Exception:
                    log.exception("metrics callback failed")


__all__ = ["EngineWorker", "Job", "QueueFull", "StepOutput"]
