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
needs_kernels = pytest.mark.skipif(bf16 is None, reason="the bf16 C++ kernels need a C++ compiler (or "
                                   "MOEPAGE_KERNELS=torch is set)")
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


@needs_kernels
def test_the_build_runs_the_core_its_target_has():
    """vdpbf16ps where the build target has AVX512-BF16, the portable core everywhere else; moepage's pool (tasks
    claimed dynamically, passive waiting) whether or not the build links OpenMP."""
    core, threads = bf16.core().split("/")
    assert core == ("avx512bf16" if "avx512_bf16" in native.target_flags() else "portable")
    assert threads == "pool"


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


def test_a_module_is_fingerprinted_by_the_headers_it_includes_only(tmp_path, monkeypatch):
    """A rebuild (and its 'compiling' notice) follows a change to the module or a header it includes, transitively,
    not one to another module's header."""
    (tmp_path / "a.cpp").write_text('#include "b.h"\n#include <vector>\n  # include "c.h"\n')
    (tmp_path / "b.h").write_text('#pragma once\n#include "c.h"\n#include "b.h"\n')
    (tmp_path / "c.h").write_text("int c;\n")
    (tmp_path / "other.h").write_text("int other;\n")
    monkeypatch.setattr(native, "CSRC", str(tmp_path))
    assert [os.path.basename(p) for p in native.local_includes(str(tmp_path / "a.cpp"))] == ["a.cpp", "b.h", "c.h"]
    before = native.source_digest("a")
    (tmp_path / "other.h").write_text("int other2;\n")
    assert native.source_digest("a") == before
    (tmp_path / "c.h").write_text("int c2;\n")
    assert native.source_digest("a") != before
    real = [os.path.basename(p) for p in native.local_includes(os.path.join(os.path.dirname(native.__file__), "csrc",
                                                                            "bf16_decode.cpp"))]
    assert "bf16_portable.h" in real and not any(name.startswith("ggml") for name in real)


@needs_kernels
@pytest.mark.parametrize("norm,in_dtype", [(True, True), (False, False)])
def test_kernel_routing_equals_route_even_on_ties(norm, in_dtype):
    """bf16 router logits tie often; the kernel's softmax top-k must pick and weigh the experts route() picks."""
    from moepage.kernels.routing import RoutingConfig, route

    cfg = RoutingConfig(top_k=8, norm_topk_prob=norm, weights_in_logits_dtype=in_dtype)
    ties = 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        logits = (torch.randint(-6, 6, (1, 64), generator=g).float() / 4).bfloat16()  # few distinct values
        w, idx = route(logits, cfg)
        experts, weights = bf16.route_softmax_topk(logits, 8, norm, in_dtype)
        order = sorted(range(8), key=lambda k: idx[0, k].item())
        assert experts == [idx[0, k].item() for k in order]
        assert torch.equal(weights, w[0, order])
        ties += logits[0].sort(descending=True).values[7] == logits[0].sort(descending=True).values[8]
    assert ties > 50  # the boundary between chosen and unchosen experts was a tie in many draws


def reference_attention_layer(h, p, k_cache, v_cache, pos, qk_mode, eps=1e-6):
    """The torch ops model.py runs for one token (T=1): norm, q/k/v, qk norm, RoPE, cache write, SDPA, o, residual,
    ffn norm, router."""
    from moepage.kernels.norm import rms_norm

    G, S, D = k_cache.shape
    N = p["q"].shape[0] // D
    r = rms_norm(h, p["attn_norm"], eps)
    q, k, v = F.linear(r, p["q"], p["bq"]), F.linear(r, p["k"], p["bk"]), F.linear(r, p["v"], p["bv"])
    if qk_mode == 2:
        q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
    q, k = q.view(1, 1, N, D), k.view(1, 1, G, D)
    if qk_mode == 1:
        q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(1, 1, G, D).transpose(1, 2)
    q = (q * p["cos"]) + (rotate_half(q) * p["sin"])
    k = (k * p["cos"]) + (rotate_half(k) * p["sin"])
    k_cache[:, pos], v_cache[:, pos] = k[0, :, 0], v[0, :, 0]
    keys, values = k_cache[None, :, : pos + 1], v_cache[None, :, : pos + 1]
    out = F.scaled_dot_product_attention(q, keys, values, scale=D**-0.5, enable_gqa=True)
    h2 = h + F.linear(out.transpose(1, 2).reshape(1, N * D), p["o"], p["bo"])
    r2 = rms_norm(h2, p["ffn_norm"], eps)
    return h2, r2, F.linear(r2, p["router"])


@needs_kernels
@pytest.mark.parametrize("qk_mode,bias,D,pos", [(1, False, 128, 700), (2, False, 64, 9), (0, True, 16, 0),
                                                 (0, False, 80, 40)])
def test_attention_decode_matches_the_torch_ops(qk_mode, bias, D, pos):
    H, N, G, S, E = 256, 8, 2, 768, 16
    p = {"attn_norm": rand(H, scale=0.3) + 1, "ffn_norm": rand(H, scale=0.3) + 1, "q": rand(N * D, H, scale=0.06),
         "k": rand(G * D, H, scale=0.06), "v": rand(G * D, H, scale=0.06), "o": rand(H, N * D, scale=0.06),
         "router": rand(E, H, scale=0.06), "bq": rand(N * D) if bias else None, "bk": rand(G * D) if bias else None,
         "bv": rand(G * D) if bias else None, "bo": rand(H) if bias else None}
    p["q_norm"], p["k_norm"] = (rand(D) + 1, rand(D) + 1) if qk_mode == 1 else (rand(N * D) + 1, rand(G * D) + 1)
    table = RotaryTable(D, 1e4, None, torch.bfloat16, "cpu")
    cos, sin = table.get(pos, 1)
    p["cos"], p["sin"] = cos, sin
    h = rand(1, H)
    k_cache, v_cache = rand(G, S, D), rand(G, S, D)
    kc, vc = k_cache.clone(), v_cache.clone()
    want = reference_attention_layer(h, p, k_cache, v_cache, pos, qk_mode)
    got = bf16.attention_decode(h, p["attn_norm"], p["ffn_norm"], 1e-6, p["q"], p["k"], p["v"], p["o"], p["bq"],
                                p["bk"], p["bv"], p["bo"], qk_mode, p["q_norm"] if qk_mode else None,
                                p["k_norm"] if qk_mode else None, cos[0], sin[0], kc, vc, pos, D**-0.5, p["router"],
                                4, True, True)
    for mine, theirs in ((kc, k_cache), (vc, v_cache)):  # the new k, v rows: the reference's up to fp32 sum order
        ulp = 2.0 ** (torch.frexp(theirs[:, pos].float())[1] - 8).float()
        assert torch.equal(mine[:, :pos], theirs[:, :pos]) and torch.equal(mine[:, pos + 1:], theirs[:, pos + 1:])
        off = (mine[:, pos].float() - theirs[:, pos].float()).abs()
        assert torch.all(off <= ulp) and (off > 0).float().mean().item() < 0.05, (off > 0).sum().item()
    for name, a, b in zip(("h", "r", "router logits"), got[:3], want):
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= 4 * b.float().abs().max().item() * 2**-8, f"{name}: {diff}"
    assert (got[0] != want[0]).float().mean().item() < 0.25  # fp32 sums in another order (AMX torch: 12.5%)
    from moepage.kernels.norm import rms_norm

    assert torch.equal(got[1], rms_norm(got[0], p["ffn_norm"], 1e-6))  # given h, the rest follows exactly
    assert (got[2] != F.linear(got[1], p["router"])).float().mean().item() <= 1 / 16
    experts, weights = bf16.route_softmax_topk(got[2], 4, True, True)
    assert (got[3], torch.equal(got[4], weights)) == (experts, True)
