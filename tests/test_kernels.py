"""The C++ bf16 decode kernels against the torch ops they replace, and the kernel build cache."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

from moepage.kernels import native
from moepage.kernels.experts import swiglu_fused
from moepage.kernels.rope import RotaryTable, rotate_half

bf16 = native.load("bf16_decode")
needs_kernels = pytest.mark.skipif(bf16 is None, reason="the bf16 C++ kernels need AVX512-BF16 and a compiler")
G = torch.Generator().manual_seed(0)


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, generator=G) * scale).bfloat16()


@needs_kernels
@pytest.mark.parametrize("m,k,n", [(1, 1024, 768), (3, 1000, 77), (8, 256, 4103)])
def test_linear_matches_torch_to_the_last_bit_almost_everywhere(m, k, n):
    x, w, b = rand(m, k), rand(n, k, scale=0.05), rand(n)
    for bias in (None, b):
        got, want = bf16.linear(x, w, bias), F.linear(x, w, bias)
        assert (got != want).float().mean().item() < 1e-3  # fp32 sums in another order: rare 1-ulp differences
        assert (got.float() - want.float()).abs().max().item() <= 2 * want.float().abs().max().item() * 2**-8


@needs_kernels
def test_experts_one_token_equals_the_expert_by_expert_sum():
    H, I = 512, 192
    x = rand(1, H)
    w13 = [rand(2 * I, H, scale=0.05) for _ in range(4)]
    w2 = [rand(H, I, scale=0.05) for _ in range(4)]
    weights = torch.softmax(torch.randn(4, generator=G), 0).bfloat16()
    want = torch.zeros_like(x)
    for k in range(4):
        want.add_((swiglu_fused(x, w13[k], w2[k]) * weights[k]).to(x.dtype))
    got = bf16.experts_one_token(x, w13, w2, weights.tolist())
    assert (got != want).float().mean().item() < 1e-2


@needs_kernels
def test_rope_is_bit_exact_and_rms_norm_nearly():
    table = RotaryTable(128, 1e6, None, torch.bfloat16, "cpu")
    x = rand(1, 4, 16, 128).transpose(1, 2)  # [1, 16, 4, 128], strided like the model's
    cos, sin = table.get(37, 4)
    assert torch.equal(bf16.rope(x, cos, sin), (x * cos) + (rotate_half(x) * sin))
    h, w = rand(64, 1024, scale=3.0), rand(1024, scale=0.5)
    ref = w * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert (bf16.rms_norm(h, w, 1e-6) != ref).float().mean().item() < 1e-3


def test_stale_build_lock_is_removed(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's lock file, on which the next load would wait forever."""
    monkeypatch.setenv("MOEPAGE_KERNEL_CACHE", str(tmp_path))
    d = native.build_directory("bf16_decode")
    lock = os.path.join(d, "lock")
    open(lock, "w").close()
    assert os.path.exists(os.path.join(native.build_directory("bf16_decode"), "lock"))  # a fresh lock stays
    old = time.time() - native.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    assert not os.path.exists(os.path.join(native.build_directory("bf16_decode"), "lock"))
