"""C++ CPU kernels (moepage/kernels/csrc/*.cpp), compiled once on first use with torch.utils.cpp_extension.

Compiled modules are cached under ~/.cache/moepage/kernels, one directory per Python environment (about 40 s per
module the first time, on 2 cores).
`load(name)` is None where the CPU lacks what the module needs, no compiler or ninja is found, or
MOEPAGE_KERNELS=torch is set; callers then use plain torch.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager

log = logging.getLogger("moepage.kernels")
CSRC = os.path.join(os.path.dirname(__file__), "csrc")
# module -> (CPU flags it needs, extra compiler flags); bump the version suffix when a source changes.
MODULES = {
    "bf16_decode": ({"avx512f", "avx512bw", "avx512_bf16"}, ["-mavx512f", "-mavx512bw", "-mavx512bf16"]),
    "bf16_unpack": ({"avx512f", "avx512bw", "avx512_vbmi2", "popcnt"}, ["-mavx512f", "-mavx512bw", "-mavx512vbmi2",
                                                                         "-mpopcnt"]),
    "ggml_cpu": (set(), []),  # portable: the SIMD is in the libggml-cpu it opens at run time
    "mxfp4": (set(), []),  # portable: its dot vectorises for the build target
}
VERSION = "v17"
STALE_LOCK_SECONDS = 600  # a build lock older than this was left by a killed build (torch would wait on it forever)


def build_directory(name: str) -> str:
    """One build directory per module, torch and Python environment: two venvs never rebuild each other's copy."""
    import torch

    env = hashlib.sha256(f"{sys.prefix}|{torch.__version__}|{VERSION}".encode()).hexdigest()[:12]
    base = os.environ.get("MOEPAGE_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "moepage", "kernels")
    path = os.path.join(base, f"{name}-{env}")
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_SECONDS:
        os.remove(lock)
    return path


@contextmanager
def build_lock(name: str):
    """Held while torch builds or opens `name`: an flock, which the kernel drops when its holder dies. Inside it no
    other moepage process is building, so a torch lock file found there was left by a killed build (torch would
    wait on it forever) and is removed."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock alone
        yield
        return
    directory = build_directory(name)
    with open(os.path.join(directory, "moepage-build.flock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = os.path.join(directory, "lock")
            if os.path.exists(stale):
                os.remove(stale)
                log.warning("%s: removed the lock a killed build left in %s", name, directory)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def source_digest(name: str) -> str:
    """sha256 of the module's source and the shared headers it may include."""
    h = hashlib.sha256()
    for path in [os.path.join(CSRC, f"{name}.cpp"), *sorted(glob.glob(os.path.join(CSRC, "*.h")))]:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _stamp(name: str) -> str:
    return os.path.join(build_directory(name), "source.sha256")


def is_built(name: str) -> bool:
    """Whether the cached module was built from the current sources (load() then only opens it)."""
    try:
        with open(_stamp(name)) as f:
            stamp = f.read().strip()
    except OSError:
        return False
    built = os.path.join(build_directory(name), f"moepage_{name}_{VERSION}.so")
    return os.path.exists(built) and stamp == source_digest(name)


_lock = threading.Lock()
_loaded: dict[str, object] = {}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runs_here(name: str) -> bool:
    """Whether this CPU (and MOEPAGE_KERNELS) lets the module run, without building it; load() may still fall back
    to torch where no compiler is found."""
    return os.environ.get("MOEPAGE_KERNELS", "auto") != "torch" and MODULES[name][0] <= cpu_flags()


def load(name: str):
    if name in _loaded:  # loaded (or known unavailable): no lock on the hot path
        return _loaded[name]
    with _lock:
        if name in _loaded:
            return _loaded[name]
        needs, flags = MODULES[name]
        module = None
        if runs_here(name):
            try:
                from torch.utils.cpp_extension import load as build

                if is_built(name):
                    log.debug("loading moepage's %s CPU kernels from %s", name, build_directory(name))
                else:
                    log.info("compiling moepage's %s CPU kernels (once per environment, under a minute; cached in %s)",
                             name, build_directory(name))
                with build_lock(name):
                    module = build(name=f"moepage_{name}_{VERSION}", sources=[os.path.join(CSRC, f"{name}.cpp")],
                                   extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"],
                                   verbose=False, build_directory=build_directory(name))
                with open(_stamp(name), "w") as f:  # what was built: the next start opens it without announcing
                    f.write(source_digest(name))
            except Exception as e:  # no compiler, no ninja, an old assembler: torch instead
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("%s CPU kernels unavailable (%s); using torch", name, first)
        _loaded[name] = module
        return module


def build_all() -> list[str]:
    """Build (or open) every module this CPU runs; the names of those whose build failed."""
    failed = []
    for name in MODULES:
        if not runs_here(name):
            lacks = " ".join(sorted(MODULES[name][0] - cpu_flags()))
            print(f"{name}: skipped ({f'this CPU lacks {lacks}' if lacks else 'MOEPAGE_KERNELS=torch'})")
        elif load(name) is None:
            failed.append(name)
            print(f"{name}: build FAILED (see the warning above)")
        else:
            print(f"{name}: built in {build_directory(name)}")
    return failed


if __name__ == "__main__":  # `python -m moepage.kernels.native`: pre-build the kernels (docker/Dockerfile)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(1 if build_all() else 0)
