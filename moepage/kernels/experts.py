"""Expert FFN over the tokens routed to one expert.

Shape legend: t tokens routed to this expert, H hidden, I expert intermediate size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moepage.kernels.cpu_bf16 import linear


def swiglu_fused(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x [t, H], w13 [2I, H] (gate rows then up rows), w2 [H, I] -> [t, H]."""
    gate, up = linear(x, w13).chunk(2, dim=-1)  # [t, I] each
    return linear(F.silu(gate) * up, w2)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Dense / shared-expert SwiGLU with separate gate (w1) and up (w3) projections."""
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)
