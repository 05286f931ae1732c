"""The OS branches of paging and of the memory budget, Linux and macOS: reads that bypass the page cache, the process's
resident memory, and the memory limit it runs under. Each is a small function that takes its inputs (file text,
numbers, the OS name, the calls it makes) as parameters, so both branches are unit-tested on any machine
(tests/test_platform.py).

- Uncached reads: Linux opens with O_DIRECT (aligned offsets, lengths and buffers: pread.py aligns them); macOS has
  no O_DIRECT and sets F_NOCACHE on the descriptor instead (fcntl); elsewhere reads are buffered.
- Resident memory: Linux /proc/self/statm; macOS task_info(MACH_TASK_BASIC_INFO). Peak: getrusage's ru_maxrss,
  which Linux reports in KiB and macOS in bytes.
- The limit: Linux cgroup v2 memory.max or v1 memory.limit_in_bytes, else physical memory; macOS has no cgroups:
  hw.memsize (the budget is then bounded by moepage's own accounting, checked against task_info's RSS).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

F_NOCACHE = 48  # <sys/fcntl.h> on macOS (Python's fcntl module exports it from 3.9 on some builds only)
NO_LIMIT = 1 << 60  # cgroup v1 writes ~2^63 rounded to pages for "unlimited"
CGROUP_V2 = "/sys/fs/cgroup/memory.max"
CGROUP_V1 = "/sys/fs/cgroup/memory/memory.limit_in_bytes"


def uncached_reads(system: str = sys.platform, has_o_direct: bool = hasattr(os, "O_DIRECT")) -> str | None:
    """How this OS reads past the page cache: "o_direct", "f_nocache", or None (buffered only)."""
    if system.startswith("linux") and has_o_direct:
        return "o_direct"
    if system == "darwin":
        return "f_nocache"
    return None


def open_uncached(path: str, system: str = sys.platform, opener: Callable[..., int] = os.open,
                  fcntl_call: Callable[[int, int, int], object] | None = None) -> int | None:
    """A read-only descriptor whose reads bypass the page cache, or None where the file system refuses (tmpfs and
    some network file systems refuse O_DIRECT) or the OS has no way."""
    how = uncached_reads(system)
    if how == "o_direct":
        try:
            return opener(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return None
    if how == "f_nocache":
        if fcntl_call is None:
            import fcntl

            fcntl_call = fcntl.fcntl
        fd = opener(path, os.O_RDONLY)
        try:
            fcntl_call(fd, F_NOCACHE, 1)
        except OSError:
            os.close(fd)
            return None
        return fd
    return None


def peak_rss_bytes(ru_maxrss: int, system: str = sys.platform) -> int:
    """getrusage().ru_maxrss in bytes: KiB on Linux, bytes on macOS."""
    return ru_maxrss if system == "darwin" else ru_maxrss * 1024


def rss_from_statm(text: str, page_size: int) -> int:
    """Resident bytes from /proc/self/statm (fields: size resident shared text lib data dt, in pages)."""
    fields = text.split()
    if len(fields) < 2 or not fields[1].isdigit():
        raise ValueError(f"unexpected /proc/self/statm: {text[:80]!r}")
    return int(fields[1]) * page_size


def limit_from_cgroup(v2_text: str | None, v1_text: str | None) -> int | None:
    """The memory limit a cgroup sets (v2 memory.max "max" or a number; v1 limit_in_bytes), None when unlimited."""
    for text in (v2_text, v1_text):
        if text is None:
            continue
        value = text.strip()
        if value == "max":
            return None
        if value.isdigit():
            return int(value) if int(value) < NO_LIMIT else None
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(4096)
    except OSError:
        return None


def _darwin_task_rss() -> int | None:
    """task_info(mach_task_self(), MACH_TASK_BASIC_INFO).resident_size, None if the call fails."""
    import ctypes
    import ctypes.util

    class TimeValue(ctypes.Structure):
        _fields_ = [("seconds", ctypes.c_int), ("microseconds", ctypes.c_int)]

    class MachTaskBasicInfo(ctypes.Structure):
        _fields_ = [("virtual_size", ctypes.c_uint64), ("resident_size", ctypes.c_uint64),
                    ("resident_size_max", ctypes.c_uint64), ("user_time", TimeValue), ("system_time", TimeValue),
                    ("policy", ctypes.c_int), ("suspend_count", ctypes.c_int)]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    info, count = MachTaskBasicInfo(), ctypes.c_uint(ctypes.sizeof(MachTaskBasicInfo) // 4)
    task = ctypes.c_uint.in_dll(libc, "mach_task_self_")
    if libc.task_info(task, 20, ctypes.byref(info), ctypes.byref(count)) != 0:  # 20: MACH_TASK_BASIC_INFO
        return None
    return int(info.resident_size)


def current_rss_bytes(system: str = sys.platform) -> int | None:
    """This process's resident bytes now, None where the OS gives no way."""
    if system == "darwin":
        return _darwin_task_rss()
    text = _read("/proc/self/statm")
    return rss_from_statm(text, os.sysconf("SC_PAGE_SIZE")) if text else None


def memory_limit_bytes(system: str = sys.platform, read: Callable[[str], str | None] = _read,
                       physical: Callable[[], int | None] | None = None) -> int | None:
    """The memory this process may use: a cgroup's limit (Linux) or else the machine's physical memory."""
    if system.startswith("linux"):
        limit = limit_from_cgroup(read(CGROUP_V2), read(CGROUP_V1))
        if limit is not None:
            return limit
    return (physical or _physical_memory)()


def _physical_memory(system: str = sys.platform) -> int | None:
    if system == "darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return int(out) if out.strip().isdigit() else None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
