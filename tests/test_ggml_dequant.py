"""GGML dequantization in torch against gguf-py's numpy reference, bit for bit, on random blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moepage.kernels.ggml import BY_NAME, QuantizedTensor, UnsupportedQuantType, dequantize

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as reference_dequantize  # noqa: E402

QUANTIZED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


# Byte offsets of the f16 scales inside one block of each type.
SCALE_OFFSETS = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2],
                 "Q5_K": [0, 2], "Q6_K": [208]}


def random_rows(qtype: str, rows: int, columns: int, seed: int) -> np.ndarray:
    """Random bytes for `rows` rows of `columns` values, with the f16 scales rewritten to finite values
    (as in real files; a random half is NaN/inf about 1/32 of the time)."""
    t = BY_NAME[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, t.row_bytes(columns)), dtype=np.uint8)
    blocks = raw.reshape(-1, t.type_size)
    for o in SCALE_OFFSETS[qtype]:
        blocks[:, o:o + 2] = rng.uniform(-2.0, 2.0, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_quantized_types_match_gguf_bit_for_bit(qtype):
    columns = 512 if BY_NAME[qtype].block_size == 256 else 96
    raw = random_rows(qtype, 7, columns, seed=QUANTIZED.index(qtype))
    ref = reference_dequantize(raw, gguf.GGMLQuantizationType[qtype])
    ours = dequantize(torch.from_numpy(raw.copy()), qtype, (7, columns), tensor="t")
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (7, columns)
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("qtype", QUANTIZED)
def test_raw_random_bytes_including_nan_scales(qtype):
    """Fully random bytes (some scales NaN/inf): same values, NaN where the reference has NaN."""
    columns = 256
    raw = np.random.default_rng(7).integers(0, 256, size=(16, BY_NAME[qtype].row_bytes(columns)), dtype=np.uint8)
    ref = reference_dequantize(raw, gguf.GGMLQuantizationType[qtype])
    ours = dequantize(torch.from_numpy(raw.copy()), qtype, (16, columns)).numpy()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qtype,np_dtype", [("F32", np.float32), ("F16", np.float16)])
def test_float_types(qtype, np_dtype):
    values = np.random.default_rng(3).standard_normal((5, 48)).astype(np_dtype)
    raw = values.view(np.uint8)
    ref = reference_dequantize(raw.view(np_dtype), gguf.GGMLQuantizationType[qtype])
    ours = dequantize(torch.from_numpy(raw.copy()), qtype, (5, 48))
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_bf16_matches_gguf_and_keeps_bf16():
    values = np.random.default_rng(4).integers(0, 2**16, size=(4, 64), dtype=np.uint16)
    values[(values & 0x7F80) == 0x7F80] = 0  # no NaN/inf patterns
    raw = values.view(np.uint8)
    ref = reference_dequantize(raw, gguf.GGMLQuantizationType.BF16)
    ours = dequantize(torch.from_numpy(raw.copy()), "BF16", (4, 64))
    np.testing.assert_array_equal(ours.numpy(), ref.reshape(4, 64))
    native = dequantize(torch.from_numpy(raw.copy()), "BF16", (4, 64), dtype=torch.bfloat16)
    assert native.dtype == torch.bfloat16 and torch.equal(native.float(), ours)


def test_cast_to_compute_dtype():
    raw = random_rows("Q8_0", 2, 64, seed=5)
    ours = dequantize(torch.from_numpy(raw), "Q8_0", (2, 64), dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "IQ4_XS", "IQ2_XXS"])
def test_unsupported_types_name_type_and_tensor(qtype):
    raw = torch.zeros(BY_NAME[qtype].type_size, dtype=torch.uint8)
    with pytest.raises(UnsupportedQuantType, match=f"unsupported quant type {qtype} in tensor 'blk.0.ffn_up_exps.weight'"):
        dequantize(raw, qtype, (1, 256), tensor="blk.0.ffn_up_exps.weight")


def test_wrong_byte_count_is_reported():
    with pytest.raises(ValueError, match="'w'.*do not hold Q8_0"):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (1, 32), tensor="w")
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block size"):
        dequantize(torch.zeros(144, dtype=torch.uint8), "Q4_K", (1, 255), tensor="w")


GGML_TYPES = QUANTIZED + ["Q2_K", "Q3_K", "IQ4_XS", "IQ4_NL"]
SCALE_OFFSETS.update({"Q2_K": [80, 82], "Q3_K": [108], "IQ4_XS": [0], "IQ4_NL": [0]})


@pytest.mark.parametrize("qtype", GGML_TYPES)
def test_ggml_decoders_match_gguf_bit_for_bit(qtype):
    """QuantizedTensor.dequantize through ggml's own to_float (kernels/ggml_cpu.py) gives gguf-py's values, bit for
    bit, for the types torch decodes and the ones only ggml does."""
    from moepage.kernels.ggml_cpu import backend

    if backend() is None:
        pytest.skip("ggml's CPU library (libggml-python) or the C++ build is unavailable here")
    columns = 512
    raw = random_rows(qtype, 9, columns, seed=11)
    ref = reference_dequantize(raw, gguf.GGMLQuantizationType[qtype])
    q = QuantizedTensor(torch.from_numpy(raw.copy()).reshape(-1), BY_NAME[qtype], (9, columns), "w")
    np.testing.assert_array_equal(q.dequantize().numpy().view(np.uint32), ref.view(np.uint32))
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
