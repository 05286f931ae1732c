"""The decode token's thread count on a shared machine: run most tokens at the configured count, every
so many tokens try `probe_tokens` tokens at the other count (1 against the configured n), and keep whichever
gave the lower median wall time per token. The tokens between probes start at `probe_first` and double after each
probe that changed nothing, up to `probe_most` (back to `probe_first` after a switch). A probe is due only while the
process gets less CPU than its threads could use (median CPU seconds per wall second of the recent tokens below
`contended` times the count): on an idle machine n threads always win, so probing there only slows tokens
(docs/performance.md). Beside CPU-burning neighbours a worker the scheduler deschedules holds every parallel region
it claimed a task of, and one thread can be faster. Only the thread count changes: every parallel region's tasks
(and so every output row) are the same for any count, so the tokens are bit for bit the same.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


@dataclass
class BusyThreadsConfig:
    probe_first: int = 4  # tokens at the chosen count before the first probe (and after a switch)
    probe_most: int = 256  # the most tokens between probes
    probe_tokens: int = 4  # tokens per probe at the other count
    window: int = 8  # recent tokens per count whose median is compared
    margin: float = 0.9  # switch only when the other count's median is below this fraction of the chosen one's
    contended: float = 0.6  # probe only while CPU per wall second is below this fraction of the chosen count


class BusyThreads:
    """next() -> threads for the next token; record(threads, seconds) after it. Inputs are injected: no clock."""

    def __init__(self, most: int, cfg: BusyThreadsConfig | None = None):
        self.most = max(1, int(most))
        self.cfg = cfg or BusyThreadsConfig()
        self.chosen = self.most
        self.recent = {n: deque(maxlen=self.cfg.window) for n in {1, self.most}}
        self.used = deque(maxlen=self.cfg.window)  # CPU seconds per wall second of recent tokens at the chosen count
        self.since_probe = 0
        self.interval = self.cfg.probe_first
        self.probing = 0  # tokens left in the running probe

    def other(self) -> int:
        return 1 if self.chosen == self.most else self.most

    def next(self) -> int:
        if self.most == 1:
            return 1
        if self.probing == 0 and self.since_probe >= self.interval and self.contended_now():
            self.probing = self.cfg.probe_tokens
            self.recent[self.other()].clear()
        return self.other() if self.probing else self.chosen

    def contended_now(self) -> bool:
        """The chosen count got less CPU than it could use (True while nothing was measured)."""
        return not self.used or statistics.median(self.used) < self.cfg.contended * self.chosen

    def record(self, threads: int, seconds: float, cpu_seconds: float | None = None) -> None:
        """threads ran one token in `seconds` of wall time, using cpu_seconds of the process's CPU (None: unknown,
        counted as contended)."""
        if self.most == 1 or threads not in self.recent:
            return
        self.recent[threads].append(seconds)
        if threads == self.chosen and not self.probing:
            if cpu_seconds is None:
                self.used.clear()
            elif seconds > 0:
                self.used.append(cpu_seconds / seconds)
        if not self.probing:
            self.since_probe += 1
            return
        self.probing -= 1
        if self.probing:
            return
        self.since_probe = 0
        mine, theirs = self.recent[self.chosen], self.recent[self.other()]
        if mine and theirs and statistics.median(theirs) < self.cfg.margin * statistics.median(mine):
            self.chosen = self.other()
            self.interval = self.cfg.probe_first
            self.used.clear()
        else:
            self.interval = min(2 * self.interval, self.cfg.probe_most)
