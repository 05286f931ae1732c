"""One prefill chunk through one Gated DeltaNet layer of the Qwen3.5-35B-A3B shape, random weights: the peak bytes of
tensors it allocates (moepage/engine/alloc_peak.py, beyond its input and the layer's weights), the largest
allocations, the mixer's planned workspace (GatedDeltaShape.workspace_nbytes) and, in a second child process
without the tracker, the peak RSS growth over the chunk.

    python bench/prefill_workspace.py [--tokens 512] [--dtype bfloat16] [--trace 12] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

# The Qwen3.5-35B-A3B text config's linear-attention sizes (hidden 2048, 16 key heads x 128, 32 value heads x 128,
# conv 4).
SHAPE = dict(hidden_size=2048, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
             linear_value_head_dim=128, linear_conv_kernel_dim=4)


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))


def layer(dtype, tokens: int):
    """(mixer, its fresh state, x [T, H], planned workspace bytes)."""
    import torch

    from moepage.engine.attention.gated_delta import GatedDeltaMixer, GatedDeltaNet, GatedDeltaShape

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, SHAPE["hidden_size"], generator=gen).to(dtype)
    shape = GatedDeltaShape.from_config(SHAPE)
    w = {n: (torch.randn(s, generator=gen) * 0.02).to(dtype) for n, s in shape.weight_shapes("qwen3_5_moe").items()}
    w["A_log"] = torch.zeros(shape.num_v_heads, dtype=dtype)
    mixer = GatedDeltaMixer(GatedDeltaNet(shape, w))
    return mixer, mixer.new_state(dtype, "cpu"), x, shape.workspace_nbytes(tokens, dtype)


def measure(dtype_name: str, tokens: int, trace: int, threads: int, track: bool) -> dict:
    import torch

    from moepage.engine.alloc_peak import AllocPeak

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    mixer, state, x, planned = layer(dtype, tokens)
    with torch.inference_mode():
        mixer.forward(x[:8], mixer.new_state(dtype, "cpu"), 0)  # warm: kernels built, thread pools up
        if not track:  # peak RSS growth alone (the tracker's own bookkeeping moves the C allocator's reuse)
            open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
            base = rss("VmRSS")
            mixer.forward(x, state, 0)
            return {"rss_growth_mib": round((rss("VmHWM") - base) / 2**20, 1)}
        with AllocPeak(trace=trace > 0) as p:
            out = mixer.forward(x, state, 0)
        del out
    result = {"dtype": dtype_name, "tokens": tokens, "peak_mib": round(p.peak / 2**20, 1),
              "planned_mib": round(planned / 2**20, 1), "peak_op": p.peak_op}
    if trace:
        result["largest"] = [(op, round(n / 2**20, 2), round(live / 2**20, 1))
                             for op, n, live in sorted(p.trace, key=lambda r: -r[1])[:trace]]
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--trace", type=int, default=12, help="list this many of the largest allocations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rss", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.dtype, a.tokens, a.trace, a.threads, not a.rss)))
        return
    cmd = [sys.executable, __file__, "--child", "--tokens", str(a.tokens), "--dtype", a.dtype, "--trace", str(a.trace),
           "--threads", str(a.threads)]  # fresh processes: each peak is the chunk's own
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    result |= json.loads(subprocess.run(cmd + ["--rss"], check=True, capture_output=True, text=True).stdout)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
