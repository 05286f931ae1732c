"""Byte sizes from the command line and how a --memory-budget splits between its parts."""
from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}


def parse_size(text: str | int) -> int:
    """'6GB' (10^9), '6GiB' or '6G' (2^30), '512MiB', '1.5G', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 6GB, 6GiB, 512MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass
class MemoryPlan:
    budget: int | None  # None: no limit, every expert may stay resident
    resident_bytes: int
    kv_bytes: int
    expert_bytes_total: int
    expert_bytes_each: int  # largest prepared expert
    experts_total: int
    top_k: int
    expert_cache_bytes: int
    on_disk_bytes: int = 0  # resident-kind weights read from disk on demand instead (the embedding table)
    buffer_bytes: int = 0  # read buffers the page-in threads keep (encoded shards are decoded from them)
    prompt_cache_bytes: int = 0  # snapshots of earlier conversations' states (the prompt cache's capacity)
    workspace_bytes: int = 0  # a prefill chunk's temporaries in its largest token mixer (TokenMixer.workspace_nbytes)

    @property
    def min_expert_cache(self) -> int:
        return self.top_k * self.expert_bytes_each

    @property
    def min_budget(self) -> int:
        return (self.resident_bytes + self.kv_bytes + self.prompt_cache_bytes + self.buffer_bytes
                + self.workspace_bytes + self.min_expert_cache)

    @property
    def fraction_resident(self) -> float:
        return min(1.0, self.expert_cache_bytes / self.expert_bytes_total) if self.expert_bytes_total else 1.0

    def summary(self) -> str:
        head = f"memory budget {human(self.budget)}" if self.budget is not None else "memory budget: unlimited"
        return (
            f"{head}: resident weights {human(self.resident_bytes)}, KV cache {human(self.kv_bytes)}, "
            + (f"prompt cache {human(self.prompt_cache_bytes)}, " if self.prompt_cache_bytes else "")
            + (f"read buffers {human(self.buffer_bytes)}, " if self.buffer_bytes else "")
            + (f"prefill workspace {human(self.workspace_bytes)}, " if self.workspace_bytes else "")
            + f"expert cache {human(self.expert_cache_bytes)} = {self.fraction_resident:.0%} of "
            f"{self.experts_total} experts ({human(self.expert_bytes_total)}, {human(self.expert_bytes_each)} each)"
            + (f"; embedding table ({human(self.on_disk_bytes)}) read from disk row by row" if self.on_disk_bytes else "")
        )


class BudgetError(ValueError):
    pass


def plan_memory(
    budget: int | None, resident_bytes: int, kv_bytes: int, expert_bytes_each: int, experts_total: int, top_k: int,
    expert_cache_bytes: int | None = None, buffer_bytes: int = 0, prompt_cache_bytes: int = 0, workspace_bytes: int = 0,
) -> MemoryPlan:
    """Split the budget; `expert_cache_bytes` overrides what is left for experts (tests, benchmarks)."""
    total = expert_bytes_each * experts_total
    if expert_cache_bytes is None:
        expert_cache_bytes = total if budget is None else (budget - resident_bytes - kv_bytes - buffer_bytes
                                                           - prompt_cache_bytes - workspace_bytes)
    plan = MemoryPlan(budget, resident_bytes, kv_bytes, total, expert_bytes_each, experts_total, top_k,
                      min(int(expert_cache_bytes), total) if total else 0, buffer_bytes=buffer_bytes,
                      prompt_cache_bytes=prompt_cache_bytes, workspace_bytes=workspace_bytes)
    if experts_total and expert_cache_bytes < plan.min_expert_cache:
        raise BudgetError(
            f"memory budget too small: resident weights {human(resident_bytes)} + KV cache {human(kv_bytes)} "
            + (f"+ read buffers {human(buffer_bytes)} " if buffer_bytes else "")
            + (f"+ prompt cache {human(prompt_cache_bytes)} " if prompt_cache_bytes else "")
            + (f"+ prefill workspace {human(workspace_bytes)} " if workspace_bytes else "")
            + f"leave {human(max(0, expert_cache_bytes))} for experts, but one token needs {top_k} "
            f"expert{'s' * (top_k != 1)} x "
            f"{human(expert_bytes_each)} = {human(plan.min_expert_cache)}; the minimum budget is "
            f"{human(plan.min_budget)} ({plan.min_budget} bytes); lower --ctx-size to shrink the KV cache"
            + (" or --prompt-cache-bytes" if prompt_cache_bytes else "")
        )
    return plan
