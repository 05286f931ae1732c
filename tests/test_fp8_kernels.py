"""The block-scaled FP8 kernel (moepage/kernels/csrc/fp8_core.h, fp8.cpp): every E4M3 byte decodes to torch's
float8_e4m3fn value, a decoded matrix is transformers' dequantized one bit for bit (float32, and bf16-rounded),
x @ W^T is the torch product of that matrix up to the order of fp32 sums (ragged blocks included), one row's result
does not depend on how many rows come with it; and the portable core gives the same bits built for x86-64,
haswell and this machine and cross-compiled for aarch64 under qemu (the laptop targets)."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest
import torch

from fp8_support import quantize_blocks
from moepage.kernels import fp8, native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "tests", "csrc", "fp8_main.cpp")
CSRC = os.path.join(ROOT, "moepage", "kernels", "csrc")
CROSS, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
FLAGS = ["-O2", "-ffp-contract=off", "-std=c++17", "-I", CSRC]  # as kernels/cpu.py builds
CASES = [(1, 64, 96, (32, 32)), (3, 100, 77, (32, 16)), (2, 5, 3, (128, 128)), (4, 256, 256, (128, 128)),
         (1, 17, 1000, (16, 64)), (1, 150, 300, (128, 128)), (2, 40, 70, (8, 24)), (1, 9, 70, (4, 24))]
# T, R, C, block: ragged last blocks, tails of the 16-lane dot, one-token rows past a 64-row table group and a
# block row, blocks that are not a multiple of 16 columns


def case(T, R, C, block, seed):
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_blocks(torch.randn(R, C, generator=g) * 0.05, block)
    return torch.randn(T, C, generator=g), fp8.Fp8Tensor(q, s, (R, C), block)


def test_every_e4m3_byte_decodes_to_torchs_value():
    codes = torch.arange(256, dtype=torch.uint8).view(16, 16)
    w = fp8.Fp8Tensor(codes, torch.ones(1, 1), (16, 16), (16, 16))
    want = codes.view(torch.float8_e4m3fn).float()
    got = fp8.dequantize(w)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(got.view(torch.int32)[~want.isnan()], want.view(torch.int32)[~want.isnan()])  # -0.0 too


@pytest.mark.parametrize("T, R, C, block", CASES)
def test_linear_is_the_dequantized_product(T, R, C, block):
    x, w = case(T, R, C, block, seed=R)
    for dtype in (torch.float32, torch.bfloat16):
        ref = fp8.dequantize_reference(w.data.view(R, C), w.scales, block, dtype)  # transformers' values
        assert torch.equal(fp8.dequantize(w, dtype), ref)
        y = fp8.linear(x.to(dtype), w)
        want = (x.to(dtype).double() @ ref.double().T)
        assert y.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        assert (y.double() - want).abs().max() <= tol * want.abs().max()


def test_a_row_does_not_depend_on_the_rows_with_it():
    if not native.runs_here("fp8") or native.load("fp8") is None:
        pytest.skip("the C++ kernel's property (torch's matmul fallback blocks rows its own way)")
    x, w = case(5, 64, 96, (32, 32), seed=3)
    whole = fp8.linear(x, w)
    assert all(torch.equal(fp8.linear(x[t : t + 1], w), whole[t : t + 1]) for t in range(5))


def test_native_kernel_is_built_here():
    if not native.runs_here("fp8"):
        pytest.skip("MOEPAGE_KERNELS=torch or no build target")
    assert native.load("fp8") is not None


def blob_and_sizes():
    blob, sizes = b"", []
    for i, (T, R, C, block) in enumerate(CASES):
        x, w = case(T, R, C, block, seed=i)
        for bf16 in (0, 1):
            blob += struct.pack("<6q", T, R, C, *block, bf16) + x.numpy().tobytes() + w.data.numpy().tobytes() \
                + w.scales.numpy().tobytes()
            sizes.append((T * R + R * C) * 4)
    return blob, sizes


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the x86 side")
    tmp = str(tmp_path_factory.mktemp("fp8-portable"))
    blob, sizes = blob_and_sizes()

    def build(name, compiler, flags):
        exe = os.path.join(tmp, name)
        run = subprocess.run([compiler, *FLAGS, *flags, MAIN, "-o", exe], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return exe

    result = {name: subprocess.run([build(name, "g++", flags)], input=blob, capture_output=True, timeout=60,
                                   check=True).stdout
              for name, flags in {"x86-64": ["-march=x86-64"], "haswell": ["-march=haswell"],
                                  "native": ["-march=native"]}.items()}
    if shutil.which(CROSS) and shutil.which(QEMU):
        result["aarch64"] = subprocess.run([QEMU, build("aarch64", CROSS, ["-static"])], input=blob,
                                           capture_output=True, timeout=120, check=True).stdout
    return result, sizes


def test_every_x86_build_gives_the_same_bits(outputs):
    result, sizes = outputs
    assert len(result["haswell"]) == sum(sizes)
    assert result["x86-64"] == result["haswell"] == result["native"]


def test_aarch64_under_qemu_gives_the_x86_bits(outputs):
    result, _ = outputs
    if "aarch64" not in result:
        pytest.skip(f"needs {CROSS} and {QEMU} (Debian: apt-get install g++-aarch64-linux-gnu qemu-user)")
    assert result["aarch64"] == result["haswell"]


def test_the_torch_module_gives_the_core_bits(outputs):
    """The torch extension (at::parallel_for over rows) computes what the core does on one thread."""
    if not native.runs_here("fp8") or native.load("fp8") is None:
        pytest.skip("the fp8 kernel is not built here")
    result, sizes = outputs
    raw, at = result["native"], 0
    for i, (T, R, C, block) in enumerate(CASES):
        x, w = case(T, R, C, block, seed=i)
        for bf16 in (False, True):
            n = sizes.pop(0)
            got = torch.frombuffer(bytearray(raw[at : at + n]), dtype=torch.float32)
            at += n
            out = native.load("fp8").linear(x.contiguous(), w.data, w.scales, R, *block, bf16)
            assert torch.equal(got[: T * R].view(T, R), out)
