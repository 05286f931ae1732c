"""What the bench/ scripts that race moepage against llama.cpp share: llama.cpp's --no-repack set in a child's own
process, a child started inside a cgroup memory cap, its one `RESULT {json}` line read back (or why there is none:
an exit code, an OOM kill), and how far two greedy runs agree. Used by quant_decode.py and avx2_decode.py; fullsize.py
has the same steps (its owner may switch to these).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def llama_no_repack(lib):
    """Before a model loads (lib = llama_cpp.llama_cpp): llama.cpp's --no-repack, so the weights stay in the file's
    mmap instead of being copied into anonymous memory (as under a cap they must). Returns the replaced function,
    for a caller that restores it."""
    default = lib.llama_model_default_params

    def no_repack():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = no_repack
    return default


def enter_cgroup(cgroup: str | None):
    """A preexec_fn that moves the child into a cgroup v1 memory cgroup (None: no cap)."""
    def enter():
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
    return enter


def run_result(system: str, cmd: list[str], cgroup: str | None = None, env: dict | None = None,
               timeout: float | None = None, cwd: str | None = None) -> dict:
    """Run cmd (inside cgroup when given) and return its RESULT json with "system" and "wall_s", or
    {"system", "error", "stderr", "wall_s"}; an exit by SIGKILL is reported as an out-of-memory kill."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                           preexec_fn=enter_cgroup(cgroup))
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {time.time() - t0:.0f} s", "wall_s": time.time() - t0}
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        killed = " (killed: out of memory)" if p.returncode in (-9, 137) else ""
        return {"system": system, "error": f"exit {p.returncode}{killed}: {p.stderr[-300:]}",
                "stderr": p.stderr[-800:], "wall_s": time.time() - t0}
    return {"system": system, **json.loads(line[len("RESULT "):]), "wall_s": time.time() - t0}


def agreement(a: list[int], b: list[int]) -> int:
    """How many greedy tokens two runs share before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def alternate(systems: list[str], repeats: int, run, line) -> dict[str, list[dict]]:
    """run(system) -> result for each system, `repeats` rounds, the order reversed every other round (so drift in the
    machine's load falls on both sides); line(rep, system, result) is printed to stderr after each run."""
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(repeats):
        for system in systems if rep % 2 == 0 else systems[::-1]:
            r = run(system)
            runs[system].append(r)
            print(line(rep, system, r), file=sys.stderr, flush=True)
    return runs
