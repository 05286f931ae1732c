"""One token through one block-scaled FP8 projection (kernels/fp8.py) against the bf16 paths, best of N.

    python bench/fp8_matvec.py --rows 2048 --cols 7168 --threads 1

Shape legend: R rows (output features), C columns (input features).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moepage.kernels import fp8
from moepage.kernels.cpu_bf16 import linear as bf16_linear


def quantize(w: torch.Tensor, block: int) -> fp8.Fp8Tensor:
    """w [R, C] (multiples of block) -> E4M3 with one amax / 448 scale per block (DeepSeek's weight quantization)."""
    R, C = w.shape
    b = w.view(R // block, block, C // block, block)
    s = b.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    q = (b / s[:, None, :, None]).to(torch.float8_e4m3fn).view(R, C)
    return fp8.Fp8Tensor(q, s.contiguous(), (R, C), (block, block))


def best(f, n: int) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=7168)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    w = quantize(torch.randn(a.rows, a.cols) * 0.02, a.block)
    wb = w.dequantize(torch.bfloat16)
    x = torch.randn(1, a.cols).bfloat16()
    print(f"[{a.rows} x {a.cols}] one token, {a.threads} thread(s), best of {a.repeats}")
    print(f"fp8 kernel           {best(lambda: fp8.linear(x, w), a.repeats):8.2f} ms  {w.nbytes / 1e6:6.1f} MB held")
    print(f"moepage bf16 kernel  {best(lambda: bf16_linear(x, wb), a.repeats):8.2f} ms  {wb.nbytes / 1e6:6.1f} MB held")
    print(f"torch bf16 F.linear  {best(lambda: F.linear(x, wb), a.repeats):8.2f} ms")
    print(f"dequantize + linear  {best(lambda: F.linear(x, fp8.dequantize(w, torch.bfloat16)), 5):8.2f} ms")


if __name__ == "__main__":
    main()
