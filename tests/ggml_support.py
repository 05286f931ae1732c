"""Random GGML weights for the quantized-kernel tests (test_quant_matvec.py, test_ggml_interleave.py): bytes with
finite scales, their float64 values by gguf-py, and the same weight in ggml's 8-row interleaved layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moepage.kernels.ggml import BY_NAME, QuantizedTensor, interleaved_for_matvec
from moepage.kernels.ggml_cpu import backend

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as reference_dequantize  # noqa: E402

GGML = backend()
# Byte offsets of the f16 scales inside one block (random bytes there are NaN/inf 1/32 of the time).
SCALE_OFFSETS = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "IQ4_NL": [0], "IQ4_XS": [0], "Q4_1": [0, 2],
                 "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108]}


def random_weight(qtype: str, rows: int, cols: int, seed: int) -> tuple[QuantizedTensor, np.ndarray]:
    """(random GGML bytes of [rows, cols] with finite scales, their float64 values by gguf-py)."""
    t = BY_NAME[qtype]
    rng = np.random.default_rng(seed)
    if qtype in ("F16", "BF16"):
        values = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
        raw = (values.astype(np.float16).view(np.uint8) if qtype == "F16"
               else torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint8))
    else:
        raw = rng.integers(0, 256, size=(rows * cols // t.block_size, t.type_size), dtype=np.uint8)
        for o in SCALE_OFFSETS[qtype]:
            raw[:, o:o + 2] = rng.uniform(-0.05, 0.05, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    raw = np.ascontiguousarray(raw).reshape(rows, -1)
    ref = reference_dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(rows, cols).astype(np.float64)
    return QuantizedTensor(torch.from_numpy(raw.reshape(-1).copy()), t, (rows, cols), qtype), ref


def interleaved(q: QuantizedTensor) -> QuantizedTensor:
    """A copy of q in ggml's 8-row interleaved layout where this CPU has its kernel (else q's plain copy)."""
    return interleaved_for_matvec(QuantizedTensor(q.data.clone(), q.type, q.shape, q.name))


def interleaves_q4_k() -> bool:
    return GGML is not None and GGML.interleaves(12)
