"""Quantized expert matmul on the CPU: torch dequantize-just-in-time + F.linear, torch's packed int4 kernel, and
moepage's C++ kernel that decodes GGML blocks inside the matrix-vector product (what the engine uses).

    python bench/quant_matmul.py [--threads 2]

One decode token (x [1, H]) through one expert's gate/up [2I, H] and down [H, I] at the bench model's shape
(H 1024, I 768: Qwen3-30B-A3B's expert width), from Q4_0 bytes (a 4-bit type whose values map exactly onto
torch's int4 groups: w = (q - 8) * d). The packed path also pays the repack at page-in, which is timed apart.
Q8_0 has a scale per 32 values, which torch's int8 kernel (one scale per row) cannot represent without
requantizing, so it is measured only as dequantize + F.linear.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moepage.kernels.ggml import BY_NAME, QuantizedTensor, dequantize
from moepage.kernels.ggml_linear import ggml_linear


def q4_0_bytes(rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random Q4_0 tensor [rows, cols]: (GGML bytes, nibbles [rows, cols] 0..15, scales [rows, cols/32])."""
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    d = (torch.rand(rows, cols // 32, generator=g) * 0.01 + 0.001).half()
    blocks = q.view(rows, cols // 32, 32)
    packed = blocks[..., :16] | (blocks[..., 16:] << 4)  # ggml: low nibbles = first half, high = second half
    raw = torch.cat([d.view(torch.uint8).view(rows, cols // 32, 2), packed], dim=-1)  # [R, C/32, 18]
    return raw.reshape(-1).contiguous(), q, d.float()


def timeit(fn, n: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    H, I = a.hidden, a.ffn
    x = torch.randn(1, H, generator=g).bfloat16()
    shapes = {"w13": (2 * I, H), "w2": (H, I)}
    q4 = {k: q4_0_bytes(*s, g) for k, s in shapes.items()}

    def jit():
        w13 = dequantize(q4["w13"][0], "Q4_0", shapes["w13"], dtype=torch.bfloat16)
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        w2 = dequantize(q4["w2"][0], "Q4_0", shapes["w2"], dtype=torch.bfloat16)
        return F.linear(F.silu(gate) * up, w2)

    def repack(k):
        _, q, d = q4[k]
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        sz = torch.stack([d.t().contiguous(), torch.zeros_like(d.t())], dim=-1).bfloat16()  # [K/32, N, 2]
        return packed, sz

    t_repack = timeit(lambda: (repack("w13"), repack("w2")), 20)
    p13, p2 = repack("w13"), repack("w2")

    def packed():
        gate, up = torch._weight_int4pack_mm_for_cpu(x, p13[0], 32, p13[1]).chunk(2, dim=-1)
        return torch._weight_int4pack_mm_for_cpu(F.silu(gate) * up, p2[0], 32, p2[1])

    ref = jit().float()
    err = (packed().float() - ref).abs().max().item()
    q8 = {k: torch.randint(0, 256, (s[0] * s[1] // 32 * 34,), generator=g, dtype=torch.uint8) for k, s in shapes.items()}
    for k in q8:  # valid f16 scales
        q8[k].view(-1, 34)[:, :2] = torch.full((q8[k].numel() // 34, 1), 0.01).half().view(torch.uint8)

    def jit_q8():
        w13 = dequantize(q8["w13"], "Q8_0", shapes["w13"], dtype=torch.bfloat16)
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, dequantize(q8["w2"], "Q8_0", shapes["w2"], dtype=torch.bfloat16))

    def fused(tensors, qtype):
        w13 = QuantizedTensor(tensors["w13"], BY_NAME[qtype], shapes["w13"])
        w2 = QuantizedTensor(tensors["w2"], BY_NAME[qtype], shapes["w2"])
        def run():
            gate, up = ggml_linear(x, w13).chunk(2, dim=-1)
            return ggml_linear(F.silu(gate) * up, w2)

        return run

    fused_q4 = fused({k: v[0] for k, v in q4.items()}, "Q4_0")
    fused_q8 = fused(q8, "Q8_0")
    err_fused = (fused_q4().float() - ref).abs().max().item()
    t_jit, t_packed, t_q8 = timeit(jit, a.iters), timeit(packed, a.iters), timeit(jit_q8, a.iters)
    t_fq4, t_fq8 = timeit(fused_q4, a.iters), timeit(fused_q8, a.iters)
    print(f"one expert, one token, H={H} I={I}, {a.threads} threads")
    print("| path | ms per expert | vs JIT Q4_0 |")
    print("|---|---|---|")
    print(f"| Q4_0 dequantize just in time + F.linear (bf16) | {t_jit * 1e3:.3f} | 1.00x |")
    print(f"| Q4_0 as torch int4pack, _weight_int4pack_mm_for_cpu | {t_packed * 1e3:.3f} | {t_jit / t_packed:.2f}x |")
    print(f"| Q4_0 blocks decoded in the matvec (moepage C++) | {t_fq4 * 1e3:.3f} | {t_jit / t_fq4:.2f}x |")
    print(f"| Q8_0 dequantize just in time + F.linear (bf16) | {t_q8 * 1e3:.3f} | {t_jit / t_q8:.2f}x |")
    print(f"| Q8_0 blocks decoded in the matvec (moepage C++) | {t_fq8 * 1e3:.3f} | {t_jit / t_fq8:.2f}x |")
    print(f"int4 repack at page-in: {t_repack * 1e3:.2f} ms per expert; max |output - JIT output|: int4pack {err:.4f} "
          f"(bf16 scales), C++ {err_fused:.4f}")


if __name__ == "__main__":
    main()
