"""LoRA adapters in the PEFT format, applied at load: merged into the resident weights, and into each routed expert
as the cache pages it in.

The format (what `peft.PeftModel.save_pretrained` writes for a transformers v4-style model, what `moepage train
--lora` writes, what vLLM reads): ADAPTER/adapter_config.json ({"peft_type": "LORA", "r", "lora_alpha",
"use_rslora", "target_modules", ...}) and ADAPTER/adapter_model.safetensors with, per adapted weight W [O, I] of
checkpoint name `<module>.weight`, the keys `base_model.model.<module>.lora_A.weight` A [r, I] and
`base_model.model.<module>.lora_B.weight` B [O, r]. The adapted weight is W + s * B @ A with s = lora_alpha / r
(lora_alpha / sqrt(r) when use_rslora), which is what PEFT computes on the fly as W x + s * B (A x).

Why merge rather than compute the low-rank path on the fly: every kernel (the fused bf16 decode, the experts'
gathered SwiGLU) then runs unchanged, and a token costs what it cost without the adapter. The price is a rank-r
product per paged-in expert (r * I * H multiply-adds per matrix, small next to reading the expert), and the
experts' A and B stay resident (counted in the resident bytes of the budget).

Adapters are untrusted files: every key must name a weight the model has, with a rank within MAX_RANK and shapes
that fit that weight; an option this merge does not implement (DoRA, LoRA biases, fan_in_fan_out, modules_to_save,
per-module alpha, transformers v5 fused `target_parameters`) is refused by name rather than ignored.

Shape legend: r rank, I in features, O out features, H hidden, E routed experts.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from moepage.engine.model_args import expert_shapes
from moepage.engine.weight_names import to_checkpoint
from moepage.paging.model_paths import read_model_json, resolve_model_file
from moepage.paging.safetensors_file import CheckpointError, SafetensorsFile, shown
from moepage.paging.sources import ExpertSource, ExpertWeights

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MAX_RANK = 4096
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
# Options whose non-default value changes the math: (config key, default values that are fine).
_REFUSED = {
    "use_dora": (False, None), "lora_bias": (False, None), "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []), "alpha_pattern": (None, {}), "target_parameters": (None, []),
    "layer_replication": (None, []), "bias": ("none", None),
}


def peft_key(checkpoint_name: str, factor: str) -> str:
    """('model.layers.0.self_attn.q_proj.weight', 'A') -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    if not checkpoint_name.endswith(".weight"):
        raise ValueError(f"{checkpoint_name!r} is not a weight")
    return f"{PEFT_PREFIX}{checkpoint_name[: -len('.weight')]}.lora_{factor}.weight"


@dataclass
class LoraFactor:
    a: torch.Tensor  # [r, I] float32
    b: torch.Tensor  # [O, r] float32
    scale: float

    def delta(self) -> torch.Tensor:
        """s * B @ A [O, I] in float32."""
        return (self.b @ self.a) * self.scale

    def merged(self, w: torch.Tensor) -> torch.Tensor:
        """W + delta, computed in float32 and returned in W's dtype and device."""
        return (w.float() + self.delta().to(w.device)).to(w.dtype).contiguous()

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


@dataclass
class Adapter:
    path: str
    config: dict
    factors: dict[str, LoraFactor]  # checkpoint weight name -> its factors


def _scale(config: dict, r: int, where: str) -> float:
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"{where}: lora_alpha must be a finite number")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def read_adapter_config(path: str) -> dict:
    where = os.path.join(path, ADAPTER_CONFIG)
    config = read_model_json(path, ADAPTER_CONFIG, "LoRA adapter config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type is {shown(config.get('peft_type'))}; only LORA adapters merge")
    for key, fine in _REFUSED.items():
        if key in config and config[key] not in fine:
            raise CheckpointError(f"{where}: {key}={shown(config[key])} is not supported by moepage's LoRA merge")
    if config.get("lora_dropout", 0) not in (0, 0.0, None) and not config.get("inference_mode", True):
        raise CheckpointError(f"{where}: a training-mode adapter with dropout; save it with inference_mode")
    return config


def read_adapter(path: str) -> Adapter:
    """The adapter directory at path, checked: LORA, supported options, complete A/B pairs of sane ranks."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such LoRA adapter directory")
    config = read_adapter_config(path)
    f = SafetensorsFile(resolve_model_file(path, ADAPTER_WEIGHTS, "LoRA adapter weights"))
    where = f.path
    try:
        pairs: dict[str, dict[str, str]] = {}
        for key in f.tensors:
            m = _KEY.match(key)
            if m is None:
                raise CheckpointError(f"{where}: tensor {shown(key)} is not a LoRA factor "
                                      f"({PEFT_PREFIX}<module>.lora_A|lora_B.weight)")
            pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = key
        if not pairs:
            raise CheckpointError(f"{where}: no LoRA factors")
        factors = {}
        for name, keys in pairs.items():
            if set(keys) != {"A", "B"}:
                raise CheckpointError(f"{where}: {shown(name)} has lora_{'A' if 'A' in keys else 'B'} only")
            ia, ib = f.tensors[keys["A"]], f.tensors[keys["B"]]
            if len(ia.shape) != 2 or len(ib.shape) != 2 or ia.shape[0] != ib.shape[1]:
                raise CheckpointError(f"{where}: {shown(name)}: lora_A {list(ia.shape)} and lora_B {list(ib.shape)} "
                                      "are not [r, in] and [out, r]")
            r = ia.shape[0]
            if not 1 <= r <= MAX_RANK or not (ia.dtype.is_floating_point and ib.dtype.is_floating_point):
                raise CheckpointError(f"{where}: {shown(name)}: rank {r} is not within 1..{MAX_RANK}, or the factors "
                                      "are not floating point")
            a, b = f.read(keys["A"]).float().clone(), f.read(keys["B"]).float().clone()
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise CheckpointError(f"{where}: {shown(name)}: non-finite values")
            factors[name] = LoraFactor(a, b, _scale(config, r, os.path.join(path, ADAPTER_CONFIG)))
    finally:
        f.close()
    return Adapter(path, config, factors)


def check_factor(adapter: Adapter, name: str, shape: tuple[int, ...]):
    fac = adapter.factors[name]
    got = (fac.b.shape[0], fac.a.shape[1])
    if tuple(shape) != got:
        raise CheckpointError(f"{adapter.path}: the adapter for {shown(name)} is [{got[0]}, {got[1]}] "
                              f"(lora_B rows x lora_A columns); the model's weight is {list(shape)}")


def expert_factor_table(ckpt, adapter: Adapter, layers: list[int], num_experts: int
                        ) -> dict[tuple[int, int], dict[str, LoraFactor]]:
    """{(layer, expert): {part: factor}} for the routed experts the adapter adapts."""
    table = ckpt.expert_names  # this checkpoint's layout of the family's names
    if not table or not all("{E}" in t for t in table.values()):
        if any(".experts." in n for n in adapter.factors):
            raise CheckpointError(f"{adapter.path}: this family stores its experts fused; adapting them is not "
                                  "supported")
        return {}
    out: dict[tuple[int, int], dict[str, LoraFactor]] = {}
    for layer in layers:
        for e in range(num_experts):
            parts = {part: adapter.factors[t.format(L=layer, E=e)] for part, t in table.items()
                     if t.format(L=layer, E=e) in adapter.factors}
            if parts:
                out[(layer, e)] = parts
    return out


class LoraExpertSource(ExpertSource):
    """An ExpertSource whose experts come out with their adapter merged (W + s * B @ A, in float32, then cast back
    to the stored dtype); experts the adapter does not touch pass through unchanged."""

    reads_into = False  # the merged weights are new tensors

    def __init__(self, base: ExpertSource, factors: dict[tuple[int, int], dict[str, LoraFactor]]):
        self.base = base
        self.factors = factors

    @property
    def expected(self):
        return self.base.expected

    @property
    def quantized(self) -> bool:
        return getattr(self.base, "quantized", False)

    def expect(self, shapes, layers, num_experts):
        self.base.expect(shapes, layers, num_experts)

    def read(self, layer: int, expert: int, into: torch.Tensor | None = None) -> ExpertWeights:
        w = self.base.read(layer, expert)
        parts = self.factors.get((layer, expert))
        if not parts:
            return w
        merged = {p: parts[p].merged(getattr(w, p)) if p in parts else getattr(w, p) for p in ("gate", "up", "down")}
        return ExpertWeights(**merged, read_nbytes=w.nbytes)

    def stored_nbytes(self, layer: int) -> int:
        return self.base.stored_nbytes(layer)

    def staging_nbytes(self, layer: int) -> int:
        return self.base.staging_nbytes(layer)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for parts in self.factors.values() for f in parts.values())

    def describe(self) -> str:
        return f"{self.base.describe()} + LoRA on {len(self.factors)} experts (merged at page-in)"


class LoraMerge:
    """An adapter applied to an opened checkpoint in two steps: open() wraps ckpt.experts (before the engine builds its
    expert loader), merge_resident(weights) merges the resident matrices once they are read."""

    def __init__(self, adapter: Adapter, ckpt, experts: dict[tuple[int, int], dict[str, LoraFactor]]):
        self.adapter, self.ckpt, self.experts = adapter, ckpt, experts

    @classmethod
    def open(cls, path: str, ckpt) -> "LoraMerge":
        adapter = read_adapter(path)
        if ckpt.kind not in ("hf", "split") or getattr(ckpt.experts, "quantized", False):
            raise CheckpointError(f"{adapter.path}: --lora merges into safetensors weights; this model is {ckpt.kind} "
                                  "(merge the adapter into the safetensors model with `moepage train --merge`, then "
                                  "convert)")
        args = ckpt.args
        experts = expert_factor_table(ckpt, adapter, list(args.moe_layers), args.num_experts)
        shapes = expert_shapes(args)
        for (layer, e), parts in experts.items():
            for part in parts:
                check_factor(adapter, ckpt.expert_names[part].format(L=layer, E=e), shapes[part])
        if experts:
            ckpt.experts = LoraExpertSource(ckpt.experts, experts)
        return cls(adapter, ckpt, experts)

    def merge_resident(self, weights: dict[str, torch.Tensor]) -> int:
        """Merge into weights (canonical name -> resident tensor, changed in place); returns the bytes of expert
        factors kept resident. Every factor must land on a weight the model has; embeddings, the lm_head, norms and
        biases are refused."""
        adapter, ckpt = self.adapter, self.ckpt
        by_name = {to_checkpoint(ckpt.names, c): c for c in weights}
        expert_names = {t.format(L=layer, E=e) for layer, e in self.experts for t in ckpt.expert_names.values()}
        for name in adapter.factors:
            canonical = by_name.get(name)
            if canonical is None and name not in expert_names:
                raise CheckpointError(f"{adapter.path}: the adapter adapts {shown(name)}, which this model does not "
                                      "have (an adapter for another model?)")
            if canonical is not None and (canonical in ("embed", "lm_head", "norm") or weights[canonical].dim() != 2):
                raise CheckpointError(f"{adapter.path}: adapting {shown(name)} is not supported (embeddings, "
                                      "lm_head, norms and biases stay as they are)")
        for name, fac in adapter.factors.items():
            canonical = by_name.get(name)
            if canonical is not None:
                check_factor(adapter, name, tuple(weights[canonical].shape))
                weights[canonical] = fac.merged(weights[canonical])
        return sum(f.nbytes for parts in self.experts.values() for f in parts.values())


def apply_lora(path: str, ckpt, weights: dict[str, torch.Tensor]) -> int:
    """Both steps at once, for a caller that builds its expert loader after reading the resident weights."""
    return LoraMerge.open(path, ckpt).merge_resident(weights)
