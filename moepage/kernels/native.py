"""C++ CPU kernels (moepage/kernels/csrc/*.cpp), compiled once on first use with torch.utils.cpp_extension.

Compiled modules are cached under ~/.cache/moepage/kernels, one directory per Python environment and build target
(about 40 s per module the first time, on 2 cores). They are compiled for the machine (kernels/cpu.py: -march=native,
or MOEPAGE_KERNEL_ARCH, e.g. `haswell` for AVX2 only; OpenMP, or moepage's own thread pool where the compiler has no
-fopenmp). `load(name)` is None where the build target or the CPU lacks what the module needs, no compiler or ninja
is found, or MOEPAGE_KERNELS=torch is set; callers then use plain torch.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager

from moepage.kernels import cpu

log = logging.getLogger("moepage.kernels")
CSRC = os.path.join(os.path.dirname(__file__), "csrc")
INCLUDE = re.compile(r'\s*#\s*include\s+"([^"]+)"')
# module -> (CPU and build-target features it needs, extra compiler flags); bump the version suffix when a source
# changes. bf16_decode and bf16_unpack are portable: each picks its AVX-512 or its portable core from the target.
MODULES = {
    "bf16_decode": (set(), []),
    "bf16_rows": (set(), []),  # portable: the row-invariant multi-row kernels on bf16_decode's one-row dot
    "bf16_unpack": (set(), []),  # portable: AVX512-VBMI2 where the target has it, bf16_12bit.h's decoder elsewhere
    "ggml_cpu": (set(), []),  # portable: the SIMD is in the libggml-cpu it opens at run time
    "ggml_gemm": (set(), []),  # portable: prompt-sized products on the same libggml-cpu (ggml_cpu_gemm.h)
    "mxfp4": (set(), []),  # portable: its dot vectorises for the build target
    "gated_delta": (set(), []),  # portable: plain loops (gated_delta_core.h) vectorised for the build target
    "fp8": (set(), []),  # portable: plain loops (fp8_core.h) vectorised for the build target
}
VERSION = "v21"
STALE_LOCK_SECONDS = 600  # a build lock older than this was left by a killed build (torch would wait on it forever)


def build_directory(name: str) -> str:
    """One build directory per module, torch and Python environment: two venvs never rebuild each other's copy."""
    import torch

    target = cpu.build_target()
    # -march=native code runs on this CPU model only: a cache carried to another machine (a Docker image) rebuilds
    machine = ",".join(sorted(cpu_flags())) if target.arch == "native" else ""
    key = f"{sys.prefix}|{torch.__version__}|{VERSION}|{target.key()}|{machine}"
    env = hashlib.sha256(key.encode()).hexdigest()[:12]
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


def local_includes(path: str, seen: set[str] | None = None) -> list[str]:
    """path and the csrc headers it includes with `#include "..."`, transitively, each once, in include order."""
    seen = set() if seen is None else seen
    if path in seen or not os.path.exists(path):
        return []
    seen.add(path)
    out = [path]
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            match = INCLUDE.match(line)
            if match:
                out += local_includes(os.path.join(os.path.dirname(path), match.group(1)), seen)
    return out


def source_digest(name: str) -> str:
    """sha256 of the module's source and the csrc headers it includes (another module's header changing does not
    rebuild this one)."""
    h = hashlib.sha256()
    for path in local_includes(os.path.join(CSRC, f"{name}.cpp")):
        h.update(os.path.basename(path).encode() + b"\0")
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


_features: dict[str, set[str] | None] = {}


def cpu_flags() -> set[str]:
    """This CPU's features (Linux /proc/cpuinfo names; macOS sysctl hw.optional mapped to them)."""
    if "cpu" not in _features:
        _features["cpu"] = cpu.cpu_features()
    return _features["cpu"]


def target_flags() -> set[str]:
    """The features the kernels' build target compiles for (empty without a compiler)."""
    key = cpu.build_target().key()
    if key not in _features:
        _features[key] = cpu.target_features(cpu.build_target())
    return _features[key] or set()


def lacks(name: str) -> set[str]:
    """What the module needs that this CPU or the build target does not have."""
    needs = MODULES[name][0]
    return (needs - cpu_flags()) | (needs - target_flags() if needs else set())


def runs_here(name: str) -> bool:
    """Whether this CPU, the build target (and MOEPAGE_KERNELS) let the module run, without building it; load() may
    still fall back to torch where no compiler is found."""
    return os.environ.get("MOEPAGE_KERNELS", "auto") != "torch" and not lacks(name)


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
                target = cpu.build_target()
                with build_lock(name):
                    module = build(name=f"moepage_{name}_{VERSION}", sources=[os.path.join(CSRC, f"{name}.cpp")],
                                   extra_cflags=[*target.cflags(), *flags], extra_ldflags=target.ldflags(),
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
            missing = " ".join(sorted(lacks(name)))
            print(f"{name}: skipped ({f'this CPU or build target lacks {missing}' if missing else 'MOEPAGE_KERNELS=torch'})")
        elif load(name) is None:
            failed.append(name)
            print(f"{name}: build FAILED (see the warning above)")
        else:
            print(f"{name}: built in {build_directory(name)}")
    return failed


if __name__ == "__main__":  # `python -m moepage.kernels.native`: pre-build the kernels (docker/Dockerfile)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(1 if build_all() else 0)
