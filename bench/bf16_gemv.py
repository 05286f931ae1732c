"""bf16 matrix-vector rate of each build of bf16_decode (one activation row, the decode case), alternating builds:

    python bench/bf16_gemv.py [--archs native,haswell] [--repeats 5] [--threads 2]

Each build runs in its own process (MOEPAGE_KERNEL_ARCH=<arch>; `native` on an AVX512-BF16 CPU is the vdpbf16ps
path, `haswell` the portable core on AVX2, `icelake-server` the portable core on AVX-512 without BF16), against
torch's F.linear in the same process. Shapes: a 151,936 x 1024 lm_head (311 MB) and a layer's 4096 x 1024 q/k/v
(8 MB), weights cold (a fresh matrix each call, larger than the caches). Prints GB/s medians (of each
process's median call and of its fastest call).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F
from moepage.kernels import native
torch.set_num_threads(int(sys.argv[1]))
m = native.load("bf16_decode")
out = {"core": m.core()}
g = torch.Generator().manual_seed(0)
for name, (n, k, copies) in {"lm_head": (151936, 1024, 2), "qkv": (4096, 1024, 48)}.items():
    ws = [(torch.randn(n, k, generator=g) * 0.02).bfloat16() for _ in range(copies)]
    x = torch.randn(1, k, generator=g).bfloat16()
    for label, fn in (("moepage", m.linear), ("torch", F.linear)):
        times = []
        for rep in range(3 * copies):
            w = ws[rep % copies]
            t = time.perf_counter()
            fn(x, w, None)
            times.append(time.perf_counter() - t)
        out[f"{name}_{label}_GBps"] = n * k * 2 / sorted(times)[len(times) // 2] / 1e9  # the median call
        out[f"{name}_{label}_best_GBps"] = n * k * 2 / min(times) / 1e9  # on a shared machine: the least disturbed
print("RESULT " + json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="native,haswell")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    archs = a.archs.split(",")
    results: dict[str, list[dict]] = {arch: [] for arch in archs}
    for rep in range(a.repeats):
        for arch in archs if rep % 2 == 0 else archs[::-1]:
            env = dict(os.environ, MOEPAGE_KERNEL_ARCH=arch)
            p = subprocess.run([sys.executable, "-c", CHILD, str(a.threads)], capture_output=True, text=True,
                               env=env, timeout=3600)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{arch}: {p.stderr[-800:]}")
            results[arch].append(json.loads(line[7:]))
            print(f"run {rep} {arch}: {results[arch][-1]}", file=sys.stderr, flush=True)
    print(f"bf16 gemv, one activation row, {a.threads} threads, medians of {a.repeats} alternating runs (GB/s)")
    for arch, rs in results.items():
        keys = [k for k in rs[0] if k.endswith("GBps")]
        print(f"  {arch:16s} core {rs[0]['core']:20s} " + ", ".join(
            f"{k[:-5]} {statistics.median(r[k] for r in rs):.1f}" for k in keys))


if __name__ == "__main__":
    main()
