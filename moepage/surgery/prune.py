"""`moepage prune`: turn one global budget (a ratio, an expert count or a size in bytes) into experts per layer.

The experts themselves are ranked over a calibration mix (selection.py; default: router-weighted activation mass); the written model
is a standard checkpoint, so every layer keeps the same number. `global_allocation` reports how a free
per-layer split of the same budget would fall, to show how uneven the layers' needs are.
"""
from __future__ import annotations

from moepage.engine.checkpoint import Checkpoint
from moepage.surgery.selection import DEFAULT_CRITERION, global_budget_per_layer


def resident_bytes(ckpt: Checkpoint) -> int:
    return sum(ckpt.tensor_nbytes(n) for n in ckpt.resident_checkpoint_names().values())


def experts_per_layer_for_budget(ckpt: Checkpoint, *, ratio: float | None = None, keep: int | None = None,
                                 max_bytes: int | None = None) -> int:
    """Exactly one of: ratio of experts kept (0, 1], experts per layer, or total checkpoint bytes."""
    given = [x is not None for x in (ratio, keep, max_bytes)]
    if sum(given) != 1:
        raise ValueError("give exactly one budget: --ratio, --keep or --max-size")
    args = ckpt.args
    E = args.num_experts
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"--ratio must be in (0, 1], got {ratio}")
        return max(1, min(E, round(ratio * E)))
    if keep is not None:
        if not 1 <= keep <= E:
            raise ValueError(f"--keep must be between 1 and the model's {E} experts per layer, got {keep}")
        return keep
    fixed = resident_bytes(ckpt)
    per_expert_row = sum(ckpt.experts.stored_nbytes(layer) for layer in args.moe_layers)  # one expert in every layer
    n = (max_bytes - fixed) // per_expert_row
    if n < 1:
        raise ValueError(f"--max-size {max_bytes} bytes is too small: the resident weights alone are {fixed} bytes and "
                         f"one expert per layer adds {per_expert_row}")
    return int(min(E, n))


def global_allocation(stats: dict, moe_layers: list[int], experts_per_layer: int,
                      criterion: str = DEFAULT_CRITERION) -> dict[int, int]:
    return global_budget_per_layer(stats, moe_layers, experts_per_layer * len(moe_layers), criterion)
