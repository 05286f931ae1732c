"""Huge pages under the largest resident matrices: a decode step streams the lm_head (and other resident GGML
matrices) once per token, and with 4 KiB pages every 4 KiB of it is another TLB entry to walk; backed by 2 MiB pages
the same read runs faster (docs/performance.md). Linux only (MADV_COLLAPSE, kernel 6.1+), in place: the bytes and
the tensor stay the same, only the pages under them change; elsewhere, or when the kernel refuses, nothing happens.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # linux/mman.h
_libc: list = []


def _madvise():
    if not _libc:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = lib.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _libc.append(fn)
    return _libc[0]


def huge_span(ptr: int, nbytes: int) -> tuple[int, int]:
    """The 2 MiB-aligned part [start, end) of the bytes at [ptr, ptr + nbytes) (start == end: none)."""
    start = (ptr + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = (ptr + nbytes) // HUGE_PAGE * HUGE_PAGE
    return (start, end) if end > start else (start, start)


def collapse(t: torch.Tensor, platform: str = sys.platform) -> int:
    """Back the 2 MiB-aligned interior of t's (CPU, contiguous) memory with huge pages; returns the bytes asked for
    (0 where nothing was done)."""
    if not platform.startswith("linux") or t.device.type != "cpu" or not t.is_contiguous():
        return 0
    start, end = huge_span(t.data_ptr(), t.numel() * t.element_size())
    if end == start:
        return 0
    try:
        return end - start if _madvise()(start, end - start, MADV_COLLAPSE) == 0 else 0
    except (OSError, AttributeError):
        return 0


def merged_spans(spans: list[tuple[int, int]], gap: int = 4096) -> list[tuple[int, int]]:
    """[start, end) byte ranges -> the ranges they cover once neighbours closer than `gap` (the page rounding of
    mappings laid out back to back) are joined."""
    out: list[list[int]] = []
    for start, end in sorted(spans):
        if out and start - out[-1][1] < gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def collapse_all(tensors: list[torch.Tensor], platform: str = sys.platform) -> int:
    """collapse() over the memory of many tensors at once, across tensors that lie back to back (an expert cache's
    slots, each a mapping of its own that the kernel placed next to the last); returns the bytes asked for."""
    if not platform.startswith("linux"):
        return 0
    spans = merged_spans([(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors
                          if t.device.type == "cpu" and t.is_contiguous() and t.numel()])
    done = 0
    for s, e in spans:
        start, end = huge_span(s, e - s)
        if end > start:
            try:
                done += end - start if _madvise()(start, end - start, MADV_COLLAPSE) == 0 else 0
            except (OSError, AttributeError):
                return done
    return done
