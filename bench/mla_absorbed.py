"""One MLA decode step's absorbed attention (engine/attention/mla.py `_absorbed`) with kv_b's halves held bf16 and
upcast every step (as before) against held float32 (as the engine now holds them): best and median of N.

    python bench/mla_absorbed.py [--heads 16 --positions 300 --threads 2 --repeats 30]

Shape legend: N heads, Dn/Dr/Dv the no-rope, rope and value head dims, C kv_lora_rank, S cached positions.
"""
from __future__ import annotations

import argparse
import time
import types

import torch

from moepage.engine.attention.mla import MLAShape, MultiLatentAttention


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=16)  # DeepSeek-V2-Lite; DeepSeek-V3: 128
    p.add_argument("--positions", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    N, Dn, Dr, Dv, C, S = a.heads, 128, 64, 128, 512, a.positions
    shape = MLAShape(num_heads=N, q_lora_rank=0, kv_lora_rank=C, qk_nope_head_dim=Dn, qk_rope_head_dim=Dr,
                     v_head_dim=Dv, softmax_scale=(Dn + Dr) ** -0.5)
    g = torch.Generator().manual_seed(0)
    kv_b = (torch.randn(N, Dn + Dv, C, generator=g) * 0.04).bfloat16()  # [N, Dn + Dv, C]
    q_nope, q_pe = torch.randn(N, 1, Dn, generator=g).bfloat16(), torch.randn(N, 1, Dr, generator=g).bfloat16()
    cached = torch.randn(S, C + Dr, generator=g).bfloat16()  # [S, C + Dr]

    def mixer(w):
        return types.SimpleNamespace(s=shape, w_uk=w[:, :Dn], w_uv_t=w[:, Dn:].transpose(1, 2))

    held = {"bf16 kv_b, upcast per step": mixer(kv_b), "float32 kv_b (held)": mixer(kv_b.float())}
    results = {k: [] for k in held}
    for _ in range(a.repeats):  # alternating, so load drift hits both
        for name, m in held.items():
            t = time.perf_counter()
            MultiLatentAttention._absorbed(m, q_nope, q_pe, cached)
            results[name].append(time.perf_counter() - t)
    outs = [MultiLatentAttention._absorbed(m, q_nope, q_pe, cached) for m in held.values()]
    print(f"absorbed step, {N} heads, {S} positions, {a.threads} thread(s), {a.repeats} runs each")
    for name, ts in results.items():
        ts.sort()
        print(f"{name:28s} best {ts[0] * 1e3:7.3f} ms  median {ts[len(ts) // 2] * 1e3:7.3f} ms")
    print("same output:", torch.equal(outs[0], outs[1]))


if __name__ == "__main__":
    main()
