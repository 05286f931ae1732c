"""A bounded thread pool for a request's CPU work (chat templates, tokenization, schema validation), so the event
loop keeps answering other requests (/health included) while it runs."""
from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor


class CpuPool:
    def __init__(self, workers: int):
        self._executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="moepage-cpu")
        self.stopping = threading.Event()  # set at shutdown: long work polls it (template rendering) and stops

    async def run(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self):
        self.stopping.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
