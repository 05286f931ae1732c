"""Make freed memory go back to the OS, so a memory budget is what the process really holds.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB); blocks below it come from the
heap and their pages stay with the process when freed. Expert slots and reads live in mappings of their own
(`pread.aligned_bytes`), so the threshold only decides where temporaries go: fixed at 1 MiB, the many
128 KiB-1 MiB temporaries of a prompt (an expert's rows, their activations) reuse heap pages instead of faulting
in fresh zeroed ones each time, and the heap gives back free space above 128 KiB at its top (what each choice
measured: docs/performance.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def return_freed_memory(mmap_threshold: int = 1 << 20, trim_threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap and trim thresholds; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
