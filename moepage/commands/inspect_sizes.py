"""Sizes `moepage inspect` computes from a config alone (no weights needed): parameter counts, bytes per expert and
the resident weights in bf16 and as a Q4_K_M GGUF, one sequence's state, and what fraction of the experts fits a
memory budget.

Q4_K_M is llama.cpp's mix, estimated here per tensor: routed experts' gate/up in Q4_K (144 bytes per 256 weights)
and down in Q6_K (210 per 256: llama.cpp keeps ffn_down at a higher type in many layers, so this is the upper
end), the lm_head in Q6_K, other matrices in Q4_K, vectors (norms, biases, DeltaNet decays and conv) and routers in F32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moepage.engine.model_args import ModelArgs, expert_shapes, resident_shape
from moepage.engine.sequence_state import sequence_nbytes, state_nbytes
from moepage.engine.weight_names import resident_dtype, resident_names

Q4_K, Q6_K = 144 / 256, 210 / 256  # bytes per weight
BUDGETS_GIB = (8, 10, 12)
BIG_BUDGETS_GIB = (16, 32, 64)  # for models whose routed experts alone pass 256 GiB in bf16 (DeepSeek-V3, Kimi K2)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class ConfigSizes:
    resident_params: int
    expert_params: int  # one routed expert
    experts: int  # routed experts in all layers
    top_k: int
    moe_layers: int
    resident_bf16: int
    resident_q4km: int
    expert_bf16: int
    expert_q4km: int

    @property
    def total_params(self) -> int:
        return self.resident_params + self.experts * self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: every resident weight and top-k experts per MoE layer."""
        return self.resident_params + self.moe_layers * self.top_k * self.expert_params


def config_sizes(args: ModelArgs) -> ConfigSizes:
    resident_params = resident_bf16 = resident_q4 = 0
    for name in resident_names(args):
        shape = resident_shape(args, name)
        n = _numel(shape)
        resident_params += n
        held = resident_dtype(args, name, torch.bfloat16).itemsize  # float32 where the engine keeps it so
        resident_bf16 += n * held
        matrix = len(shape) == 2 and min(shape) > 1 and not name.endswith(".router")  # routers stay F32
        resident_q4 += n * (Q6_K if name == "lm_head" else Q4_K) if matrix and held == 2 else n * 4
    parts = expert_shapes(args)
    expert = sum(_numel(s) for s in parts.values())
    q4 = (_numel(parts["gate"]) + _numel(parts["up"])) * Q4_K + _numel(parts["down"]) * Q6_K
    return ConfigSizes(resident_params, expert, len(args.moe_layers) * args.num_experts, args.top_k,
                       len(args.moe_layers), resident_bf16, int(resident_q4), 2 * expert, int(q4))


def recurrent_state_nbytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """One sequence's state in the recurrent (linear-attention) layers, whatever its length."""
    return state_nbytes(args, 0, dtype)


def kv_nbytes_per_1k(args: ModelArgs, dtype: torch.dtype) -> int:
    return state_nbytes(args, 1000, dtype) - recurrent_state_nbytes(args, dtype)


def fraction_that_fits(budget: int, resident: int, state: int, expert_each: int, experts: int) -> float:
    """Fraction of all routed experts an expert cache holds once resident weights and state are taken."""
    if not experts:
        return 1.0
    return max(0.0, min(1.0, (budget - resident - state) // max(1, expert_each) / experts))


def budgets_for(sizes: ConfigSizes) -> tuple[int, ...]:
    """The budgets the table shows: laptop sizes, or 16/32/64 GiB for the models far bigger than any laptop."""
    return BIG_BUDGETS_GIB if sizes.experts * sizes.expert_bf16 > 256 << 30 else BUDGETS_GIB


def budget_table(args: ModelArgs, sizes: ConfigSizes, ctx: int) -> list[str]:
    """Lines of the table: fraction of experts resident at each of budgets_for(sizes) GiB, bf16 and Q4_K_M, with
    one sequence's recurrent state and ctx tokens of KV (MLA: the latent cache) counted."""
    state = sequence_nbytes(args, ctx, torch.bfloat16)  # as the engine's plan counts a slot
    rows = [f"  {'budget':>8}  {'bf16':>6}  {'Q4_K_M':>6}   (one sequence's state for {ctx} tokens counted)"]
    for gib in budgets_for(sizes):
        b = gib << 30
        cells = [fraction_that_fits(b, sizes.resident_bf16, state, sizes.expert_bf16, sizes.experts),
                 fraction_that_fits(b, sizes.resident_q4km, state, sizes.expert_q4km, sizes.experts)]
        rows.append(f"  {gib:>4} GiB  " + "  ".join(f"{c:>6.0%}" for c in cells))
    return rows
