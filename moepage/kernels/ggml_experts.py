"""Expert FFN over GGML-quantized weights, multiplied on their stored bytes by ggml's kernels where present.

Shape legend: t tokens routed to this expert, H hidden, I expert intermediate size, E experts of one token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moepage.kernels.ggml import QuantizedTensor, backend_for
from moepage.kernels.ggml_linear import ggml_linear


def swiglu_quantized(x: torch.Tensor, gate: QuantizedTensor, up: QuantizedTensor, down: QuantizedTensor) -> torch.Tensor:
    """x [t, H]; gate, up: [I, H]; down: [H, I] (GGML bytes) -> [t, H], computed in x's dtype with llama.cpp's
    activation rounding for each weight type."""
    g = ggml_linear(x, gate)  # [t, I]
    u = ggml_linear(x, up)  # [t, I]
    return ggml_linear(F.silu(g) * u, down)  # [t, H]


def experts_one_token(x: torch.Tensor, experts: list[tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor]],
                      weights: list[float], residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [1, H] through experts (gate, up, down), weighted by weights and summed in list order (+ residual [1, H]),
    in one C++ call: x converted once for every gate and up matrix, each expert's activation once for its down.
    None where ggml's kernels do not apply (the caller computes expert by expert)."""
    gate, up, down = experts[0]
    b = backend_for(gate)
    if b is None or backend_for(up) is None or backend_for(down) is None or x.dim() != 2 or x.shape[0] != 1 \
            or x.device.type != "cpu":
        return None
    types = (gate.kernel_type, up.kernel_type, down.kernel_type)
    width = gate.shape[0]
    for g, u, d in experts[1:]:  # one layer's experts share their types; checked, not assumed
        if (g.kernel_type, u.kernel_type, d.kernel_type) != types or g.shape != gate.shape or d.shape != down.shape \
                or not (g.data.is_contiguous() and u.data.is_contiguous() and d.data.is_contiguous()):
            return None
    if x.shape[1] % b.activation_block(gate.type.id) or x.shape[1] % b.activation_block(up.type.id) \
            or width % b.activation_block(down.type.id):
        return None
    return b.experts_one_token(x, [e[0].data for e in experts], [e[1].data for e in experts],
                               [e[2].data for e in experts], types, width, weights, residual)
