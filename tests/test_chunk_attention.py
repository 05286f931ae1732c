"""A prompt chunk's attention over a cached prefix (moepage/kernels/chunk_attention.py) runs in torch's fused flash
kernel with a bool [T, S] mask: it equals the explicit-mask math attention (float32 closely, bf16 within bf16
steps) for GQA, a sliding window and MLA's wider keys, and never allocates the [N, T, S] scores."""
from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from moepage.kernels.chunk_attention import attend_chunk, chunk_mask


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference(q, keys, values, q_start, k_start, scale, window=None):
    """Every score materialised: the math backend, K/V expanded per query head, in float64."""
    N, G = q.shape[1], keys.shape[1]
    k = keys.double().repeat_interleave(N // G, dim=1)
    v = values.double().repeat_interleave(N // G, dim=1)
    mask = chunk_mask(q_start, q.shape[2], k_start, keys.shape[2], window, q.device)
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


CASES = {  # N, G, T, S (keys, the chunk's own last), D, Dv, window, k_start
    "gqa": (8, 2, 48, 200, 64, 64, None, 0),
    "mha": (4, 4, 17, 90, 32, 32, None, 0),
    "sliding": (8, 2, 40, 71, 64, 64, 32, 129),  # kept window - 1 positions before the chunk, from position 129
    "mla": (4, 4, 24, 100, 48, 32, None, 0),  # keys [nope | rope] wider than the values
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_over_a_cached_prefix_attends_as_the_explicit_mask_does(case, dtype):
    N, G, T, S, D, Dv, window, k_start = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    q = torch.randn(1, N, T, D, generator=gen).to(dtype)
    keys = torch.randn(1, G, S, D, generator=gen).to(dtype)
    values = torch.randn(1, G, S, Dv, generator=gen).to(dtype)
    q_start = k_start + S - T
    got = attend_chunk(q, keys, values, q_start, k_start, D**-0.5, window)
    want = reference(q, keys, values, q_start, k_start, D**-0.5, window)
    assert got.shape == (1, N, T, Dv) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - want).abs().max().item() < tol
    again = attend_chunk(q.clone(), keys.clone(), values.clone(), q_start, k_start, D**-0.5, window)
    assert torch.equal(got, again)  # the same chunk gives the same bits (re-use exactness rests on it)


def test_no_scores_tensor_is_allocated():
    """512 queries over 4,096 keys, 8 heads: the [N, T, S] float32 scores alone would be 64 MiB."""
    N, G, T, S, D = 8, 2, 512, 4096, 64
    q = torch.randn(1, N, T, D, dtype=torch.bfloat16)
    keys, values = torch.randn(1, G, S, D, dtype=torch.bfloat16), torch.randn(1, G, S, D, dtype=torch.bfloat16)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        attend_chunk(q, keys, values, S - T, 0, D**-0.5)
    biggest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    scores = N * T * S * 4
    assert 0 < biggest < scores // 8, f"an op allocated {biggest} bytes (scores would be {scores})"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:  # the check can fail: math does
        torch.ops.aten._scaled_dot_product_attention_math(q, keys, values, chunk_mask(S - T, T, 0, S, None, q.device),
                                                          scale=D**-0.5, enable_gqa=True)
    assert max(e.cpu_memory_usage for e in prof.events()) >= scores // 2


def test_other_threads_keep_every_attention_backend():
    """The engine thread's chunk attention flips no process-wide SDPA switch: a `sdpa_kernel` context there left
    another thread's GQA-broadcast SDPA with no kernel ("No available kernel", bug)."""
    q, keys = torch.randn(1, 4, 8, 32), torch.randn(1, 2, 40, 32)
    done, seen = threading.Event(), set()

    def engine():
        for _ in range(100):
            attend_chunk(q, keys, keys, 32, 0, 32**-0.5)
        done.set()

    worker = threading.Thread(target=engine)
    worker.start()
    while not done.is_set():
        seen.add((torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()))
        time.sleep(0)  # the GIL to the engine thread
    worker.join()
    assert seen <= {(True, True)}
    F.scaled_dot_product_attention(q[:, :, :1], keys[:, :1], keys[:, :1])  # broadcast heads: the math path
