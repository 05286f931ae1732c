"""Progress bars on stderr for jobs that can take more than a few seconds (split, verify, profile, extract, ...).

A bar appears only once its job has run `delay` seconds, so quick runs print nothing extra; TQDM_DELAY sets that
delay and TQDM_DISABLE=1 hides every bar (tqdm's own variables, read when the bar starts).
"""
from __future__ import annotations

import os
import sys
from typing import Iterable

from tqdm import tqdm

DEFAULT_DELAY_S = 2.0


def bar(iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it",
        unit_scale: bool = False) -> tqdm:
    """A tqdm bar on stderr: redrawn in place on a terminal, a line every 10 s into a log file."""
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, file=sys.stderr,
                delay=float(os.environ.get("TQDM_DELAY", DEFAULT_DELAY_S)),
                disable=os.environ.get("TQDM_DISABLE", "") not in ("", "0"),
                mininterval=0.1 if tty else 10.0, dynamic_ncols=tty)


class Progress:
    """A `progress(done, total)` callback for library functions: a bar, started on the first call."""

    def __init__(self, desc: str, unit: str = "it", unit_scale: bool = False):
        self.desc, self.unit, self.unit_scale = desc, unit, unit_scale
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int):
        if self._bar is None:
            self._bar = bar(desc=self.desc, total=total, unit=self.unit, unit_scale=self.unit_scale)
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self):
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc):
        self.close()
