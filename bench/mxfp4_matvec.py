"""MXFP4 matvec: moepage's kernel (csrc/mxfp4.cpp: float activations) against the same matrix as bf16 through torch
and ggml's MXFP4 vec_dot (Q8_0 activations), on gpt-oss-20b's expert shapes. Process CPU time, one torch thread.

    python bench/mxfp4_matvec.py
"""
from __future__ import annotations

import time

import torch

from moepage.kernels import mxfp4
from moepage.kernels.ggml import BY_NAME, QuantizedTensor
from moepage.kernels.ggml_linear import ggml_linear

SHAPES = ((5760, 2880), (2880, 2880))  # gpt-oss-20b: gate_up [2I, H], down [H, I]


def cpu_ms(f, n: int = 30) -> float:
    f()
    t0 = time.process_time()
    for _ in range(n):
        f()
    return (time.process_time() - t0) / n * 1e3


def main():
    torch.set_num_threads(1)
    for rows, cols in SHAPES:
        blocks, scales = mxfp4.quantize(torch.randn(rows, cols) * 0.02)
        w = mxfp4.Mxfp4Tensor(blocks, scales, (rows, cols))
        wb = w.dequantize().bfloat16()
        q = QuantizedTensor(mxfp4.to_ggml(blocks, scales).reshape(-1).contiguous(), BY_NAME["MXFP4"], (rows, cols))
        for tokens in (1, 8):
            x = torch.randn(tokens, cols)
            ours, bf16 = cpu_ms(lambda: mxfp4.linear(x, w)), cpu_ms(lambda: torch.nn.functional.linear(x.bfloat16(), wb))
            ggml = cpu_ms(lambda: ggml_linear(x, q))
            print(f"[{rows} x {cols}] T={tokens}: moepage MXFP4 {ours:.2f} ms, bf16 F.linear {bf16:.2f} ms, "
                  f"ggml MXFP4 {ggml:.2f} ms")


if __name__ == "__main__":
    main()
