"""Expert FFN over GGML-quantized weights: each weight is dequantized just in time for this expert's tokens.

Shape legend: t tokens routed to this expert, H hidden, I expert intermediate size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moepage.kernels.ggml import QuantizedTensor
from moepage.kernels.ggml_linear import ggml_linear


def swiglu_quantized(x: torch.Tensor, gate: QuantizedTensor, up: QuantizedTensor, down: QuantizedTensor) -> torch.Tensor:
    """x [t, H]; gate, up: [I, H]; down: [H, I] (GGML bytes) -> [t, H], computed in x's dtype with llama.cpp's
    activation rounding for each weight type."""
    g = ggml_linear(x, gate)  # [t, I]
    u = ggml_linear(x, up)  # [t, I]
    return ggml_linear(F.silu(g) * u, down)  # [t, H]
