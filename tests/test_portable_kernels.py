"""The portable bf16 core (moepage/kernels/csrc/bf16_portable.h) gives the same bits on every ISA: built for x86-64
baseline (SSE2), for haswell (AVX2 + FMA + F16C) and for this machine, and cross-compiled for aarch64 (NEON) and run
under qemu-aarch64, one input through tests/csrc/portable_kernels_main.cpp gives byte-identical outputs; and those
outputs are the torch ops' up to the order of fp32 sums (rope exactly). And the torch module built for AVX2 only,
without OpenMP (what an AVX2 laptop and Apple clang get), passes tests/test_kernels.py."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moepage.kernels.rope import RotaryTable, rotate_half
from moepage.paging.bf16_12bit import PackedMatrix, pack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "tests", "csrc", "portable_kernels_main.cpp")
CSRC = os.path.join(ROOT, "moepage", "kernels", "csrc")
CROSS, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
FLAGS = ["-O2", "-ffp-contract=off", "-std=c++17", "-I", CSRC]  # -ffp-contract=off as kernels/cpu.py builds
G = torch.Generator().manual_seed(0)

GEMV = [(1, 1024, 96), (3, 1000, 17), (2, 77, 9), (1, 16, 5), (1, 5, 3)]  # M, K, N: every tail of dot()
ATTEND = [(4, 300, 128), (2, 7, 80), (1, 1, 64), (3, 33, 16), (2, 5, 72)]  # R, P, D
RMS, ROPE = [(4, 1024), (2, 80)], [128, 64, 80]
UNPACK = [1, 63, 64, 65, 200, 4096 + 17]  # values: every block position, a partial last block
GEMV12 = [(40, 1024, 16), (7, 128, 3), (5, 64, 8)]  # N, K, rows per table


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, generator=G) * scale).bfloat16()


def u16(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.int16).numpy().tobytes()


def header(*ints: int) -> bytes:
    return struct.pack(f"<{len(ints)}q", *ints)


def make_input():
    """The records and, per record, (kind, inputs) to check the decoded outputs with."""
    blob, cases = b"", []
    for M, K, N in GEMV:
        x, w = rand(M, K), rand(N, K, scale=0.05)
        blob += header(1, M, K, N) + u16(x) + u16(w)
        cases.append(("gemv", (x, w), M * N * 4))
    for R, P, D in ATTEND:
        q, k, v = rand(R, D), rand(P, D), rand(P, D)
        k[P // 2] *= 30  # one position far ahead of the rest: weights that underflow
        blob += header(2, R, P, D) + struct.pack("<f", D**-0.5) + u16(q) + u16(k) + u16(v)
        cases.append(("attend", (q, k, v), R * D * 2))
    for R, D in RMS:
        x, w = rand(R, D, scale=3.0), rand(D, scale=0.5)
        blob += header(3, R, D) + struct.pack("<f", 1e-6) + u16(x) + u16(w)
        cases.append(("rms", (x, w), R * D * 2))
    for D in ROPE:
        cos, sin = RotaryTable(D, 1e4, None, torch.bfloat16, "cpu").get(37, 1)
        x = rand(D)
        blob += header(4, D) + u16(x) + u16(cos[0]) + u16(sin[0])
        cases.append(("rope", (x, cos[0], sin[0]), D * 2))
    for n in UNPACK:  # arbitrary bit patterns: many escapes
        t = torch.randint(-(2**15), 2**15, (n,), generator=G, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        p = pack(t)
        blob += header(6, n, p.exc.numel()) + b"".join(getattr(p, k).numpy().tobytes() for k in ("lo", "codes", "exc", "lut"))
        cases.append(("unpack12", (t, p.exc.numel()), 8 + n * 2))
    for N, K, T in GEMV12:  # normal weights with odd bit patterns mixed in (finite)
        w = rand(N, K, scale=0.02)
        odd = torch.randint(-(2**15), 2**15, w.shape, generator=G, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        w = torch.where((torch.rand(w.shape, generator=G) < 0.05) & odd.float().abs().lt(1e3), odd, w)
        x = rand(1, K)
        PackedMatrix.ROWS, rows = T, PackedMatrix.ROWS
        m = PackedMatrix.of(w)
        PackedMatrix.ROWS = rows
        blob += header(1, 1, K, N) + u16(x) + u16(w)  # the bf16 matvec on the same matrix, to compare with
        cases.append(("gemv", (x, w), N * 4))
        blob += (header(7, N, K, T, m.exc.numel()) + u16(x) + m.lo.numpy().tobytes() + m.codes.numpy().tobytes()
                 + m.exc.numpy().tobytes() + m.row_exc.numpy().tobytes() + m.luts.numpy().tobytes())
        cases.append(("gemv12", (x, w, m.exc.numel()), N * 4))
    x = torch.cat([-torch.rand(1000, generator=G) * 90, torch.tensor([0.0, -80.0, -80.5, -1e-8, -float("inf")])])
    blob += header(5, x.numel()) + x.numpy().tobytes()
    cases.append(("exp", (x,), x.numel() * 4))
    return blob, cases


def build(tmp, name, compiler, flags):
    out = os.path.join(tmp, name)
    run = subprocess.run([compiler, *FLAGS, *flags, MAIN, "-o", out], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Each build's bytes for the same input (the aarch64 one only where the cross compiler and qemu are found)."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the x86 side")
    tmp = str(tmp_path_factory.mktemp("portable"))
    blob, cases = make_input()
    builds = {"x86-64": ["-march=x86-64"], "haswell": ["-march=haswell"], "native": ["-march=native"]}
    result = {}
    for name, flags in builds.items():
        exe = build(tmp, name, "g++", flags)
        result[name] = subprocess.run([exe], input=blob, capture_output=True, timeout=60, check=True).stdout
    if shutil.which(CROSS) and shutil.which(QEMU):
        exe = build(tmp, "aarch64", CROSS, ["-static"])
        result["aarch64"] = subprocess.run([QEMU, exe], input=blob, capture_output=True, timeout=120,
                                           check=True).stdout
    return result, cases


def test_every_x86_build_gives_the_same_bits(outputs):
    result, cases = outputs
    assert len(result["haswell"]) == sum(c[2] for c in cases)
    assert result["x86-64"] == result["haswell"] == result["native"]


def test_aarch64_neon_under_qemu_gives_the_x86_bits(outputs):
    result, _ = outputs
    if "aarch64" not in result:
        pytest.skip(f"needs {CROSS} and {QEMU} (Debian: apt-get install g++-aarch64-linux-gnu qemu-user)")
    assert result["aarch64"] == result["haswell"]


def split(result: bytes, cases):
    at = 0
    for kind, inputs, n in cases:
        raw = bytearray(result[at : at + n])
        at += n
        if kind == "unpack12":
            got = (struct.unpack("<q", raw[:8])[0], torch.frombuffer(raw[8:], dtype=torch.bfloat16))
        else:
            got = torch.frombuffer(raw, dtype=torch.float32 if kind in ("gemv", "gemv12", "exp") else torch.bfloat16)
        yield kind, inputs, got


def test_the_portable_core_computes_the_torch_ops(outputs):
    """Not only the same everywhere, but right: the torch ops up to the order of fp32 additions."""
    result, cases = outputs
    previous = None
    for kind, inputs, got in split(result["haswell"], cases):
        if kind == "unpack12":
            t, escapes = inputs
            used, values = got
            assert (escapes > 0 or t.numel() <= 15) and used == escapes
            assert torch.equal(values.view(torch.int16), t.view(torch.int16))
        elif kind == "gemv12":  # bit for bit the bf16 matvec on the decoded matrix (the record before it)
            assert inputs[2] > 0 and torch.equal(got.view(torch.int32), previous.view(torch.int32))
        elif kind == "gemv":
            x, w = inputs
            want = x.double() @ w.double().T
            assert (got.view(want.shape).double() - want).abs().max() <= 1e-5 * want.abs().max()
        elif kind == "attend":
            q, k, v = inputs
            want = F.scaled_dot_product_attention(q[None, :, None], k[None, None], v[None, None],
                                                  scale=q.shape[-1] ** -0.5)[0, :, 0]
            diff = (got.view(want.shape).float() - want.float()).abs().max().item()
            assert diff <= 4 * want.float().abs().max().item() * 2**-8, (q.shape, k.shape, diff)
        elif kind == "rms":
            x, w = inputs
            want = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
            assert (got.view(want.shape) != want).float().mean().item() < 1e-2
        elif kind == "rope":
            x, cos, sin = inputs
            assert torch.equal(got, (x * cos) + (rotate_half(x) * sin))
        else:
            (x,) = inputs
            want = torch.exp(x.double())
            live = x >= -80
            assert torch.all(got[~live] == 0) and torch.all(got[live] > 0)
            assert ((got[live].double() - want[live]).abs() / want[live]).max() < 4e-7  # ~2 ulp
        previous = got


def test_the_avx2_build_without_openmp_passes_the_kernel_tests():
    """tests/test_kernels.py and the one-call token step's bits (tests/test_bf16_token.py) with bf16_decode built for
    haswell and moepage's own thread pool (~40 s to compile once per environment; cached after)."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    env = dict(os.environ, MOEPAGE_KERNEL_ARCH="haswell", MOEPAGE_KERNEL_OPENMP="0")
    env.pop("MOEPAGE_KERNELS", None)
    tests = [os.path.join(ROOT, "tests", name) for name in ("test_kernels.py", "test_bf16_token.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                         capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout
