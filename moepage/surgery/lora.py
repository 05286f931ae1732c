"""LoRA fine-tuning of a dense or MoE checkpoint with the existing trainer, saved in the PEFT adapter format.

`LoraDecoder` is a TrainableDecoder whose weights are frozen and whose targeted matrices read W + s * B @ A (s =
alpha / r), A [r, I] initialised as PEFT does (kaiming-uniform, a = sqrt(5)) and B [O, r] zero, so training starts
from exactly the base model. The trainer (surgery/train.py) sees an ordinary model whose only trainable parameters
are the factors; `save_adapter` writes them as adapter_config.json + adapter_model.safetensors under the PEFT key
names (engine/lora_merge.py reads the same format), and `save_pretrained` of a LoraDecoder writes the merged model.

Targets (--target, comma-separated): q_proj, k_proj, v_proj, o_proj (attention), experts (every routed expert's
gate/up/down; on a dense model, the MLP). The adapter config lists the projections' leaf names (q_proj, gate_proj,
...), the form PEFT matches against a transformers v4 model and converts for the fused v5 MoE modules.

Shape legend: r rank, I in features, O out features.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from moepage.engine.lora_merge import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_RANK, peft_key
from moepage.surgery.trainable_model import EXPERT_PARTS, TrainableDecoder, _key, canonical_expert, checkpoint_names

ATTENTION_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
TARGETS = (*ATTENTION_TARGETS, "experts")
LEAF = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = ("q_proj", "v_proj", "experts")
    seed: int = 0

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def validate(self):
        if not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"--rank must be between 1 and {MAX_RANK}, got {self.rank}")
        if self.alpha is not None and (not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"--alpha must be a positive number, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"--target {','.join(unknown) or '(empty)'}: choose from {', '.join(TARGETS)}")


def parse_targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def target_weights(model: TrainableDecoder, targets: tuple[str, ...]) -> list[str]:
    """The canonical names of the matrices the targets adapt, in model order."""
    a = model.args
    out = []
    for i in range(a.num_layers):
        out += [f"layers.{i}.{ATTENTION_TARGETS[t]}" for t in ATTENTION_TARGETS if t in targets]
        if "experts" not in targets:
            continue
        if a.sparse_layers[i]:
            out += [canonical_expert(i, e, part) for e in range(a.num_experts) for part in EXPERT_PARTS]
        elif not a.moe_layers:  # a dense model: its MLP is what the experts became
            out += [f"layers.{i}.dense_{part}" for part in EXPERT_PARTS]
    return out


class LoraDecoder(TrainableDecoder):
    def __init__(self, base: TrainableDecoder, spec: LoraSpec):
        spec.validate()
        super().__init__(base.config, base.canonical_state())
        for p in self.params.values():
            p.requires_grad_(False)
        self.spec = spec
        self.targets = target_weights(self, spec.targets)
        if not self.targets:
            raise ValueError(f"--target {','.join(spec.targets)} names no weight of this model")
        g = torch.Generator().manual_seed(spec.seed)
        self.lora_a, self.lora_b = nn.ParameterDict(), nn.ParameterDict()
        for c in self.targets:
            out_f, in_f = self.params[_key(c)].shape
            bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on [r, I], as PEFT initialises lora_A
            self.lora_a[_key(c)] = nn.Parameter(torch.empty(spec.rank, in_f).uniform_(-bound, bound, generator=g))
            self.lora_b[_key(c)] = nn.Parameter(torch.zeros(out_f, spec.rank))

    def p(self, canonical: str) -> torch.Tensor:
        w = self.params[_key(canonical)]
        k = _key(canonical)
        if k in self.lora_a:
            return w + (self.lora_b[k] @ self.lora_a[k]) * self.spec.scale
        return w

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """{PEFT key: factor} for every adapted weight (float32)."""
        names = checkpoint_names(self.config, self.args)
        out = {}
        for c in self.targets:
            out[peft_key(names[c], "A")] = self.lora_a[_key(c)].detach().float().contiguous()
            out[peft_key(names[c], "B")] = self.lora_b[_key(c)].detach().float().contiguous()
        return out

    def target_modules(self) -> list[str]:
        """Leaf module names for adapter_config.json (how PEFT matches modules)."""
        leaves = {names.rsplit(".", 2)[-2] for names in
                  (checkpoint_names(self.config, self.args)[c] for c in self.targets)}
        return sorted(leaves)


def adapter_config(model: LoraDecoder, base_model: str) -> dict:
    """adapter_config.json in PEFT's LoraConfig fields (inference mode, no dropout, no bias)."""
    spec = model.spec
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": spec.rank, "lora_alpha": spec.alpha if spec.alpha is not None else spec.rank, "lora_dropout": 0.0,
        "target_modules": model.target_modules(), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }


def save_adapter(model: LoraDecoder, out_dir: str, base_model: str):
    """Write out_dir/adapter_config.json and out_dir/adapter_model.safetensors (PEFT format)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ADAPTER_WEIGHTS + ".tmp")
    save_file(model.adapter_tensors(), tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, ADAPTER_WEIGHTS))
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config(model, base_model), f, indent=2)
        f.write("\n")


def lora_card(model: LoraDecoder, base_model: str, result: dict, merged: bool) -> str:
    """README.md for an adapter directory (or its merged model): what was adapted, how, and the training outcome."""
    from moepage import __version__

    spec = model.spec
    what = "the base model with the adapter merged in" if merged else "a LoRA adapter (PEFT format)"
    loss = ", ".join(f"{k} {result[k]:.4f}" for k in ("loss", "lm", "distill") if k in result)
    return "\n".join([
        "---", f"base_model: {base_model}", "tags:", "- moepage", "- lora", *(["- peft"] if not merged else []), "---",
        "", f"# {os.path.basename(os.path.normpath(base_model))} + LoRA", "",
        f"Made with moepage {__version__} `train --lora`: {what}.", "",
        f"- rank {spec.rank}, alpha {spec.alpha if spec.alpha is not None else spec.rank}, targets "
        f"{', '.join(spec.targets)} ({len(model.targets)} matrices: {', '.join(model.target_modules())})",
        f"- {result.get('step', 0)} steps" + (f"; last logged {loss}" if loss else ""),
        "- serve the adapter without merging: `moepage serve BASE --lora ADAPTER` (merged at load and into each "
        "routed expert as it pages in); transformers + PEFT: `PeftModel.from_pretrained(model, ADAPTER)`",
        "",
    ])
