"""One decode token's Gated DeltaNet recurrent update: the torch step (kernels/gated_delta.py
recurrent_gated_delta_rule) against the C++ step (csrc/gated_delta_core.h through recurrent_step), per layer.

    python bench/gated_delta_step.py [--threads 1,2] [--iters 300]

Shapes (Hk, Hv, Dk, Dv): Qwen3.5-35B-A3B / Qwen3.6-35B-A3B (16, 32, 128, 128), Qwen3-Next-80B-A3B (16, 32, 128, 128
with Hv 32), the bench model (8, 16, 128, 128) and the tests' tiny one (2, 4, 16, 8). Prints the median microseconds
per step of each (runs alternate, 7 rounds) and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moepage.kernels import native
from moepage.kernels.gated_delta import recurrent_gated_delta_rule, recurrent_step

SHAPES = {"35B-A3B": (16, 32, 128, 128), "bench model": (8, 16, 128, 128), "tiny": (2, 4, 16, 8)}


def per_step_us(fn, args, state, iters: int) -> float:
    s = state.clone()
    t0 = time.perf_counter()
    for _ in range(iters):
        _, s = fn(*args, s)
    return 1e6 * (time.perf_counter() - t0) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--iters", type=int, default=300)
    a = ap.parse_args()
    if native.load("gated_delta") is None:
        raise SystemExit("the gated_delta C++ module did not build here")
    g = torch.Generator().manual_seed(0)
    for threads in map(int, a.threads.split(",")):
        torch.set_num_threads(threads)
        for name, (Hk, Hv, Dk, Dv) in SHAPES.items():
            args = (torch.randn(1, Hk, Dk, generator=g), torch.randn(1, Hk, Dk, generator=g),
                    torch.randn(1, Hv, Dv, generator=g), -torch.rand(1, Hv, generator=g), torch.rand(1, Hv, generator=g))
            state = torch.randn(Hv, Dk, Dv, generator=g) * 0.1
            rounds = {"torch": [], "c++": []}
            for r in range(7):
                order = [("torch", recurrent_gated_delta_rule), ("c++", recurrent_step)][:: 1 if r % 2 else -1]
                for label, fn in order:
                    rounds[label].append(per_step_us(fn, args, state, a.iters))
            t, c = statistics.median(rounds["torch"]), statistics.median(rounds["c++"])
            print(f"threads {threads}  {name:12s} Hv {Hv:3d} Dk {Dk:3d} Dv {Dv:3d}: torch {t:8.1f} us  "
                  f"c++ {c:8.1f} us  {t / c:5.2f}x")


if __name__ == "__main__":
    main()
