"""One decode token's quantized matvec, x [1, K] @ W [N, K]^T: moepage's path (kernels/csrc/ggml_cpu.cpp over
libggml-cpu's `vec_dot`, or the 8-row interleaved gemv for "Q4_K x8"; where moepage's own AVX-512 kernel stands in
for the library's, Q6_K and Q4_K x8 on AVX512BW builds, the library's kernel alone in the next column: the same bits)
and torch (dequantize, then F.linear). docs/performance.md also has moepage's own former block-decoding gemv
(csrc/ggml_gemv.cpp, removed) measured with this script.

    python bench/quant_matvec.py [--threads 2] [--iters 20]
    MOEPAGE_GGML_LIB=.../llama_cpp/lib/libggml-cpu.so python bench/quant_matvec.py   # llama.cpp's own build

Shapes: the bench model's 151,936 x 1024 lm_head, and Qwen3-30B-A3B's experts (gate/up 768 x 2048, down 2048 x 768).
Weights are random bytes with finite scales (the kernels' speed does not depend on the values). Prints ms per
call (median of --iters) and the weight bytes read per second.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from moepage.kernels.ggml import BY_NAME, INTERLEAVED, dequantize
from moepage.kernels.ggml_cpu import backend

SHAPES = {"lm_head": (151936, 1024), "expert gate/up": (768, 2048), "expert down": (2048, 768)}
TYPES = {"lm_head": ["Q6_K", "Q4_K", "Q4_K x8", "Q8_0", "Q4_0", "Q5_0"],
         "expert gate/up": ["Q4_K", "Q4_K x8", "Q5_K", "Q4_0", "IQ4_XS"],
         "expert down": ["Q6_K", "Q5_0", "Q4_K", "Q8_0"]}
SCALE_OFFSETS = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}


def random_weight(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    t = BY_NAME[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // t.block_size, t.type_size), dtype=np.uint8)
    for o in SCALE_OFFSETS[qtype]:
        raw[:, o:o + 2] = rng.uniform(-0.01, 0.01, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(-1))


def median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ggml = backend()
    print(f"ggml: {ggml.path if ggml else 'unavailable'} ({ggml.features if ggml else '-'}); {a.threads} threads")
    print("| shape | type | MB | moepage ms (GB/s) | the library's own kernel ms (GB/s) "
          "| torch dequantize + F.linear ms |")
    print("|---|---|---|---|---|---|")
    own = set(ggml.module.own_kernel_types()) if ggml else set()
    for label, (n, k) in SHAPES.items():
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
        for qtype in TYPES[label]:
            x8 = qtype.endswith(" x8")  # ggml's 8-row interleaved layout, as resident Q4_K matrices are held
            t = BY_NAME[qtype.split()[0]]
            w = random_weight(t.name, n, k)
            type_id = t.id | (INTERLEAVED if x8 else 0)
            if x8:
                if not (ggml and ggml.interleaves(t.id)):
                    continue
                ggml.relayout_(w, t.id, n, k, True)
            mb = w.numel() / 1e6
            cells = []
            if ggml and ggml.multiplies(t.id):
                ms = median_ms(lambda: ggml.linear(x, w, type_id, n), a.iters)
                cells.append(f"{ms:.2f} ({mb / ms:.1f})")
                if type_id in own:  # the same bits by the library's kernel
                    was = ggml.module.use_own_kernels(False)
                    ms = median_ms(lambda: ggml.linear(x, w, type_id, n), a.iters)
                    ggml.module.use_own_kernels(was)
                    cells.append(f"{ms:.2f} ({mb / ms:.1f})")
                else:
                    cells.append("the same kernel")
            else:
                cells += ["-", "-"]
            try:
                ms = median_ms(lambda: F.linear(x, dequantize(w, t, (n, k))), max(3, a.iters // 5)) if not x8 else None
                cells.append(f"{ms:.1f}" if ms is not None else "-")
            except ValueError:
                cells.append("-")
            print(f"| {label} {n} x {k} | {qtype} | {mb:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
