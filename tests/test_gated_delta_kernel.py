"""The C++ Gated DeltaNet decode step (moepage/kernels/csrc/gated_delta_core.h) against the torch step
(kernels/gated_delta.py recurrent_gated_delta_rule, transformers' torch_recurrent_gated_delta_rule's math): within
fp32 rounding of it over 24 consecutive tokens, no further from a float64 step than torch is; the same bytes from the
torch extension and from standalone builds for x86-64 baseline, haswell, this machine and aarch64 (under qemu); and
the decode of a Gated DeltaNet layer taking it, on its state in place.

Shape legend: Hk key heads, Hv value heads, Dk key head dim, Dv value head dim.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest
import torch

from moepage.kernels import native
from moepage.kernels.gated_delta import _heads_first, recurrent_gated_delta_rule, recurrent_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "tests", "csrc", "gated_delta_main.cpp")
CSRC = os.path.join(ROOT, "moepage", "kernels", "csrc")
CROSS, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
FLAGS = ["-O2", "-ffp-contract=off", "-std=c++17", "-I", CSRC]  # -ffp-contract=off as kernels/cpu.py builds
SHAPES = [(2, 4, 16, 8), (3, 6, 17, 9), (1, 1, 5, 3), (4, 8, 128, 128)]  # Hk, Hv, Dk, Dv (35B-A3B: 16, 32, 128, 128)


@pytest.fixture(scope="module")
def module():
    m = native.load("gated_delta")
    if m is None:
        pytest.skip("the gated_delta C++ module did not build here (see the log); decode uses the torch step")
    return m


def token(Hk, Hv, Dk, Dv, g: torch.Generator):
    """One decode token's q, k [1, Hk, Dk], v [1, Hv, Dv], g (log decay) and beta [1, Hv]."""
    return (torch.randn(1, Hk, Dk, generator=g), torch.randn(1, Hk, Dk, generator=g), torch.randn(1, Hv, Dv, generator=g),
            -torch.rand(1, Hv, generator=g) * 4, torch.rand(1, Hv, generator=g))


@pytest.mark.parametrize("shape", SHAPES)
def test_step_is_the_torch_step_within_fp32_rounding(module, shape):
    g = torch.Generator().manual_seed(sum(shape))
    Hk, Hv, Dk, Dv = shape
    theirs = ours = torch.randn(Hv, Dk, Dv, generator=g) * 0.3
    exact = ours.double()
    ours = ours.clone()
    for _ in range(24):
        q, k, v, lg, beta = token(*shape, g)
        want, theirs = recurrent_gated_delta_rule(q, k, v, lg, beta, theirs)
        got, same = recurrent_step(q, k, v, lg, beta, ours)
        assert same.data_ptr() == ours.data_ptr(), "the C++ step updates the state in place"
        ref, exact = recurrent_gated_delta_rule(*(t.double() for t in (q, k, v, lg, beta)), exact)
        scale = ref.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale
        # the two fp32 orders of summation are equally close to float64
        assert (got.double() - ref).abs().max().item() <= 2 * (want.double() - ref).abs().max().item() + 1e-6 * scale
    assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()


def records(g: torch.Generator):
    """stdin for gated_delta_main.cpp, and each record's torch inputs (already through _heads_first)."""
    blob, cases = b"", []
    for Hk, Hv, Dk, Dv in SHAPES:
        q, k, v, lg, beta = _heads_first(*token(Hk, Hv, Dk, Dv, g))
        S = torch.randn(Hv, Dk, Dv, generator=g)
        args = [S, q[:, 0], k[:, 0], v[:, 0], lg[:, 0].exp(), beta[:, 0].contiguous()]
        blob += struct.pack("<3q", Hv, Dk, Dv) + b"".join(t.contiguous().numpy().tobytes() for t in args)
        cases.append(args)
    return blob, cases


def build(tmp, name, compiler, flags):
    out = os.path.join(tmp, name)
    run = subprocess.run([compiler, *FLAGS, *flags, MAIN, "-o", out], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def test_every_build_gives_the_extensions_bytes(module, tmp_path):
    """x86-64 baseline (SSE2), haswell (AVX2), this machine and aarch64 (NEON, under qemu where found) standalone
    builds and the torch extension (built for the kernels' target, -O3) give identical bytes."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the standalone side")
    blob, cases = records(torch.Generator().manual_seed(3))
    want = b""
    for S, q, k, v, decay, beta in cases:
        S, out = S.clone(), torch.empty(v.shape)
        module.step(S, q, k, v, decay, beta, out)
        want += out.numpy().tobytes() + S.numpy().tobytes()
    builds = {name: build(str(tmp_path), name, "g++", [f"-march={name}"]) for name in ("x86-64", "haswell", "native")}
    got = {name: subprocess.run([exe], input=blob, capture_output=True, timeout=60, check=True).stdout
           for name, exe in builds.items()}
    if shutil.which(CROSS) and shutil.which(QEMU):
        exe = build(str(tmp_path), "aarch64", CROSS, ["-static"])
        got["aarch64"] = subprocess.run([QEMU, exe], input=blob, capture_output=True, timeout=120, check=True).stdout
    for name, out in got.items():
        assert out == want, name
    if "aarch64" not in got:
        pytest.skip(f"x86 builds checked; aarch64 needs {CROSS} and {QEMU} (apt-get install g++-aarch64-linux-gnu "
                    "qemu-user)")


def test_bad_arguments_are_refused(module):
    S = torch.zeros(2, 4, 3)
    q, v, d = torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2)
    with pytest.raises(RuntimeError, match="q has shape"):
        module.step(S, torch.zeros(2, 5), q, v, d, d, torch.empty(2, 3))
    with pytest.raises(RuntimeError, match="float32"):
        module.step(S.double(), q, q, v, d, d, torch.empty(2, 3))
    with pytest.raises(RuntimeError, match="contiguous"):
        module.step(S.transpose(1, 2).contiguous().transpose(1, 2), q, q, v, d, d, torch.empty(2, 3))


def test_layer_decode_takes_the_step_in_place(module, monkeypatch):
    """A Gated DeltaNet layer's decode runs the C++ step on its state in place, and gives the torch step's output
    (the module marked unavailable) within fp32 rounding."""
    from moepage.engine.attention.gated_delta import GatedDeltaNet, GatedDeltaShape

    shape = GatedDeltaShape(hidden=32, num_k_heads=2, num_v_heads=4, k_head_dim=16, v_head_dim=8)
    g = torch.Generator().manual_seed(5)
    weights = {n: torch.randn(s, generator=g) * 0.2 for n, s in shape.weight_shapes("qwen3_5_moe").items()}
    net = GatedDeltaNet(shape, weights)
    state = net.new_state()
    net(torch.randn(5, 32, generator=g), state)  # a prompt: the chunked rule
    torch_state, before = state.snapshot(), state.recurrent.data_ptr()
    x = torch.randn(1, 32, generator=g)
    out = net.decode(x, state)
    assert state.recurrent.data_ptr() == before and state.tokens == 6
    monkeypatch.setitem(native._loaded, "gated_delta", None)  # as where the module does not build
    want = net.decode(x, torch_state)
    assert torch_state.recurrent.data_ptr() != before
    assert (out - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert (state.recurrent - torch_state.recurrent).abs().max().item() <= 1e-5 * torch_state.recurrent.abs().max().item()
