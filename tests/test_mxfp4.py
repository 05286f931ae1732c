"""MXFP4 bytes: the decoders (torch and C++) bit-exact against transformers' reference dequantization and gguf-py's,
the two layouts converted into each other, and the matvec on the stored bytes.

Shape legend: E experts, R rows, C columns, G = C / 32 blocks per row, T tokens.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moepage.kernels import mxfp4, native
from moepage.kernels.ggml import BY_NAME, QuantizedTensor, ggml_backend

convert = pytest.importorskip("transformers.integrations.mxfp4").convert_moe_packed_tensors
gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def packed(draw, max_rows=6, max_blocks=4, scale_bytes=st.integers(0, 255)):
    """(blocks [E, R, G, 16], scales [E, R, G]) of any bytes, scale bytes drawn from scale_bytes."""
    e, r, g = draw(st.integers(1, 2)), draw(st.integers(1, max_rows)), draw(st.integers(1, max_blocks))
    raw = draw(st.binary(min_size=e * r * g * 16, max_size=e * r * g * 16))
    scales = draw(st.lists(scale_bytes, min_size=e * r * g, max_size=e * r * g))
    return (torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(e, r, g, 16),
            torch.tensor(scales, dtype=torch.uint8).view(e, r, g))


def reference(blocks, scales) -> torch.Tensor:
    """transformers' dequantization in fp32, untransposed: [E, R, C]."""
    return convert(blocks, scales, dtype=torch.float32).transpose(1, 2)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (signed zeros and infinities included; NaN only where the other is NaN)."""
    nan = a.isnan()
    return bool(torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan]))


def kernels():
    m = native.load("mxfp4")
    if m is None:
        pytest.skip("the mxfp4 C++ kernels are not built here (MOEPAGE_KERNELS=torch or no compiler)")
    return m


@SETTINGS
@given(packed())
def test_torch_decoder_is_transformers_bit_for_bit(p):
    blocks, scales = p
    assert same_bits(mxfp4.dequantize_reference(blocks, scales), reference(blocks, scales))


@SETTINGS
@given(packed())
def test_cpp_decoder_is_transformers_bit_for_bit(p):
    blocks, scales = p
    m = kernels()
    want = reference(blocks, scales)
    e, r, g, _ = blocks.shape
    for i in range(e):
        assert same_bits(m.dequantize(blocks[i].contiguous(), scales[i].contiguous(), r, g * 32), want[i])


def test_every_code_at_every_scale():
    """All 16 codes in both nibbles under each of the 256 scale bytes (0 and 1 give subnormals, 255 overflows)."""
    m = kernels()
    codes = torch.arange(256, dtype=torch.uint8)  # byte b: low nibble b & 15, high nibble b >> 4
    blocks = codes.view(16, 16).repeat(256, 1, 1).view(256, 16, 1, 16).repeat(1, 1, 1, 1)  # [256 scales, 16, 1, 16]
    blocks = blocks.reshape(1, 256 * 16, 1, 16)
    scales = torch.arange(256, dtype=torch.uint8).repeat_interleave(16).view(1, 256 * 16, 1)
    want = reference(blocks, scales)
    assert same_bits(m.dequantize(blocks[0].contiguous(), scales[0].contiguous(), 256 * 16, 32), want[0])
    assert torch.isinf(want).any() and (want[want != 0].abs().min() < 2.0 ** -126)  # the edges were exercised


@SETTINGS
@given(packed())
def test_ggml_layout_holds_the_same_values(p):
    """to_ggml's bytes decode (gguf-py, ggml's own decoder, ours) to transformers' values; from_ggml inverts it."""
    blocks, scales = p
    raw = mxfp4.to_ggml(blocks, scales)  # [E, R, G * 17]
    e, r, g, _ = blocks.shape
    assert raw.shape == (e, r, g * 17)
    want = reference(blocks, scales).reshape(e, r, g * 32)
    gguf_values = torch.from_numpy(gguf_quants.dequantize(raw.numpy(), GGMLQuantizationType.MXFP4).copy())
    assert torch.equal(gguf_values, want)  # values (ggml's zeros are +0)
    assert torch.equal(mxfp4.dequantize_ggml(raw.reshape(-1, 17)).view(e, r, g * 32), want)
    back_blocks, back_scales = mxfp4.from_ggml(raw)
    assert torch.equal(back_blocks, blocks) and torch.equal(back_scales, scales)
    if ggml_backend() is not None and ggml_backend().dequantizes(BY_NAME["MXFP4"].id):
        q = QuantizedTensor(raw[0].reshape(-1).contiguous(), BY_NAME["MXFP4"], (r, g * 32))
        assert torch.equal(q.dequantize(torch.float32), want[0])


def test_mxfp4_is_ggml_type_39_of_17_byte_blocks():
    t = BY_NAME["MXFP4"]
    assert (t.id, t.block_size, t.type_size) == (int(GGMLQuantizationType.MXFP4), 32, mxfp4.GGML_BLOCK_BYTES)
    assert mxfp4.nbytes(2880, 2880) * 8 / (2880 * 2880) == 4.25  # gpt-oss-20b's expert shape: 4.25 bits a weight


@SETTINGS
@given(packed(max_rows=8, max_blocks=6, scale_bytes=st.integers(120, 130)), st.integers(1, 5), st.integers(0, 2 ** 16))
def test_linear_matches_the_dequantized_product(p, tokens, seed):
    blocks, scales = p
    kernels()
    r, g = blocks.shape[1:3]
    w = mxfp4.Mxfp4Tensor(blocks[0], scales[0], (r, g * 32))
    x = torch.randn(tokens, g * 32, generator=torch.Generator().manual_seed(seed))
    want = (x.double() @ reference(blocks, scales)[0].double().T)
    got = mxfp4.linear(x, w)
    assert got.dtype == torch.float32 and got.shape == (tokens, r)
    scale = x.abs().double() @ reference(blocks, scales)[0].abs().double().T
    assert ((got.double() - want).abs() <= 1e-6 * scale + 1e-30).all()
    for t in range(tokens):  # row-invariant: the same dot whatever the number of tokens
        assert torch.equal(mxfp4.linear(x[t : t + 1], w), got[t : t + 1])


def test_linear_is_exact_where_every_sum_is():
    """Small integers times codes at scale 2^0 sum exactly in fp32 in any order: the product must be exact."""
    kernels()
    g = torch.Generator().manual_seed(1)
    r, c = 33, 256
    blocks = torch.randint(0, 256, (r, c // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.full((r, c // 32), 127, dtype=torch.uint8)
    w = mxfp4.Mxfp4Tensor(blocks, scales, (r, c))
    x = torch.randint(-8, 9, (3, c), generator=g).float()
    want = (x.double() @ w.dequantize().double().T).float()
    assert torch.equal(mxfp4.linear(x, w), want)
    bias = torch.randn(r)
    assert torch.equal(mxfp4.linear(x, w, bias), want + bias)
    assert torch.equal(mxfp4.linear(x.bfloat16(), w), want.bfloat16())


def test_torch_fallback_gives_the_same_values(monkeypatch):
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (4, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 130, (4, 2), dtype=torch.uint8, generator=g)
    w = mxfp4.Mxfp4Tensor(blocks, scales, (4, 64))
    x = torch.randn(2, 64, generator=g)
    fast = mxfp4.linear(x, w)
    monkeypatch.setattr(mxfp4, "_module", lambda: None)
    torch.testing.assert_close(mxfp4.linear(x, w), fast, rtol=1e-6, atol=1e-5)
    assert torch.equal(mxfp4.dequantize(w), w.dequantize())


@pytest.mark.parametrize("blocks_n, scales_n, shape, match", [
    (16 * 2, 2, (2, 48), "whole 32-value blocks"),
    (16 * 2, 3, (2, 32), "do not hold"),
    (16 * 3, 2, (2, 32), "do not hold"),
])
def test_bad_sizes_are_refused(blocks_n, scales_n, shape, match):
    with pytest.raises(ValueError, match=match):
        mxfp4.Mxfp4Tensor(torch.zeros(blocks_n, dtype=torch.uint8), torch.zeros(scales_n, dtype=torch.uint8), shape)
    m = kernels()
    if "whole" not in match:
        with pytest.raises(RuntimeError, match="do not hold"):
            m.linear(torch.zeros(1, shape[1]), torch.zeros(blocks_n, dtype=torch.uint8),
                     torch.zeros(scales_n, dtype=torch.uint8), shape[0])


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 3), st.floats(1e-3, 1e3), st.integers(0, 2 ** 16))
def test_quantize_lands_on_the_grid_it_decodes_to(rows, blocks, magnitude, seed):
    """quantize -> decode is within half a step of FP4 of each value (a step is at most 2 * 2^scale < 2/3 of the
    block's largest magnitude), and re-quantizing decoded values is exact."""
    w = torch.randn(rows, blocks * 32, generator=torch.Generator().manual_seed(seed)) * magnitude
    b, s = mxfp4.quantize(w)
    d = mxfp4.dequantize_reference(b, s)
    amax = w.view(rows, blocks, 32).abs().amax(-1, keepdim=True)
    assert ((d - w).view(rows, blocks, 32).abs() <= amax / 3).all()
    b2, s2 = mxfp4.quantize(d)
    assert torch.equal(mxfp4.dequantize_reference(b2, s2), d)


# The C++ core alone (tests/csrc/mxfp4_main.cpp) built for x86-64 baseline (the portable path, std::fma), haswell
# and this machine (the AVX2 path), and for aarch64 under qemu: the same bytes for one input, and the torch module's.
CORE_CASES = [(1, 7, 64), (1, 64, 2880), (3, 9, 96), (8, 33, 256), (5, 2, 32), (9, 5, 160)]  # T, R, C


def core_input():
    g = torch.Generator().manual_seed(3)
    blob, cases = b"", []
    for t, r, c in CORE_CASES:
        blocks = torch.randint(0, 256, (r, c // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(100, 140, (r, c // 32), dtype=torch.uint8, generator=g)
        scales[0, 0] = 0  # a subnormal scale
        x = torch.randn(t, c, generator=g) * 3
        blob += struct.pack("<3q", t, r, c) + x.numpy().tobytes() + blocks.numpy().tobytes() + scales.numpy().tobytes()
        cases.append((x, blocks, scales))
    return blob, cases


def test_the_core_gives_the_same_bits_on_every_isa_and_in_torch(tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    m = kernels()
    blob, cases = core_input()
    main = os.path.join(ROOT, "tests", "csrc", "mxfp4_main.cpp")
    flags = ["-O2", "-ffp-contract=off", "-std=c++17", "-I", os.path.join(ROOT, "moepage", "kernels", "csrc")]
    builds = {"x86-64": ("g++", ["-march=x86-64"]), "haswell": ("g++", ["-march=haswell"]),
              "native": ("g++", ["-march=native"])}
    if shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64"):
        builds["aarch64"] = ("aarch64-linux-gnu-g++", ["-static"])
    out = {}
    for name, (cxx, extra) in builds.items():
        exe = str(tmp_path / name)
        run = subprocess.run([cxx, *flags, *extra, main, "-o", exe], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        cmd = ["qemu-aarch64", exe] if name == "aarch64" else [exe]
        out[name] = subprocess.run(cmd, input=blob, capture_output=True, timeout=120, check=True).stdout
    assert out["x86-64"] == out["haswell"] == out["native"]
    if "aarch64" in out:
        assert out["aarch64"] == out["haswell"]
    want = b""
    for x, blocks, scales in cases:
        r, c = blocks.shape[0], blocks.shape[1] * 32
        got = m.linear(x, blocks, scales, r)
        scale = x.abs().double() @ mxfp4.dequantize_reference(blocks, scales).abs().double().T
        exact = x.double() @ mxfp4.dequantize_reference(blocks, scales).double().T
        assert ((got.double() - exact).abs() <= 1e-6 * scale + 1e-30).all()
        want += got.numpy().tobytes() + m.dequantize(blocks, scales, r, c).numpy().tobytes()
    assert out["haswell"] == want
