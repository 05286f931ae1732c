"""Sparse upcycling: a dense Qwen2/Qwen3 checkpoint -> a Qwen2-MoE/Qwen3-MoE checkpoint (N routed + optional shared).

The exact construction (with drop = 0 the MoE computes the dense function, up to float rounding):
- Qwen3-MoE (no shared expert): every routed expert is a copy of the dense FFN f and norm_topk_prob = True, so
  the top-k weights of every token sum to 1 and  sum_k w_k f(x) = f(x)  for any router.
- Qwen2-MoE (shared expert behind a sigmoid gate): the shared expert is f with its gate weight set to zero, so
  sigmoid(0) = 0.5 exactly and it contributes f(x)/2; the routed experts are copies of f with down_proj scaled
  by 0.5 (exact in binary floating point) and normalised top-k weights, contributing f(x)/2. Total f(x).
  Both halves carry the dense function, so shared-only serving starts at "half the FFN" and training decides.
Drop-Upcycling (Nakamura et al. 2025): in each routed copy a fraction `drop` of the intermediate neurons (rows of
gate/up, the matching columns of down) is re-drawn from N(mean, std) of the original matrix, so copies diverge.
The router starts from N(0, router_std) so the first routing is near uniform.

Shape legend: H hidden, I intermediate size, E routed experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moepage.surgery.trainable_model import EXPERT_PARTS, TrainableDecoder, canonical_expert, family_of

MOE_TARGET = {"qwen2": ("qwen2_moe", "Qwen2MoeForCausalLM"), "qwen3": ("qwen3_moe", "Qwen3MoeForCausalLM")}


@dataclass(frozen=True)
class UpcycleConfig:
    experts: int = 4
    shared: int = 1  # 0 or 1 shared expert
    top_k: int = 2
    drop: float = 0.0  # fraction of each routed copy's intermediate neurons re-initialised
    router_std: float = 0.02
    seed: int = 0

    def validate(self, dense_type: str):
        if dense_type not in MOE_TARGET:
            raise ValueError(f"upcycle reads dense {', '.join(MOE_TARGET)} checkpoints, not {dense_type!r}")
        if self.experts < 1:
            raise ValueError(f"--experts must be >= 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"--top-k must be between 1 and --experts ({self.experts}), got {self.top_k}")
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"--drop must be in [0, 1), got {self.drop}")
        if self.shared not in (0, 1):
            raise ValueError(f"--shared must be 0 or 1, got {self.shared}")
        if dense_type == "qwen3" and self.shared:
            raise ValueError("Qwen3-MoE has no shared expert: use --shared 0 for a Qwen3 model "
                             "(or upcycle a Qwen2 model into Qwen2-MoE, which has one)")
        if dense_type == "qwen2" and not self.shared:
            raise ValueError("Qwen2-MoE always has a shared expert in transformers: use --shared 1 for a Qwen2 model")


def moe_config(dense: dict, cfg: UpcycleConfig) -> dict:
    model_type, architecture = MOE_TARGET[dense["model_type"]]
    intermediate = int(dense["intermediate_size"])
    out = {k: v for k, v in dense.items() if k not in ("architectures", "model_type")}
    out.update({
        "architectures": [architecture], "model_type": model_type, "num_experts": cfg.experts,
        "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": intermediate, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "moepage_upcycle": {"from": dense["model_type"], "experts": cfg.experts, "shared": cfg.shared,
                            "top_k": cfg.top_k, "drop": cfg.drop, "seed": cfg.seed},
    })
    if model_type == "qwen2_moe":
        out["shared_expert_intermediate_size"] = intermediate if cfg.shared else 0
        out["qkv_bias"] = True
    return out


def drop_neurons(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, drop: float, g: torch.Generator):
    """Re-draw round(drop * I) random intermediate neurons of one FFN copy: gate/up [I, H] rows, down [H, I] columns."""
    gate, up, down = gate.clone(), up.clone(), down.clone()
    count = int(round(drop * gate.shape[0]))
    if count == 0:
        return gate, up, down
    chosen = torch.randperm(gate.shape[0], generator=g)[:count]
    for w, rows in ((gate, True), (up, True), (down, False)):
        mean, std = w.mean().item(), w.std().item()
        shape = (count, w.shape[1]) if rows else (w.shape[0], count)
        fresh = torch.randn(*shape, generator=g) * std + mean
        if rows:
            w[chosen] = fresh.to(w.dtype)
        else:
            w[:, chosen] = fresh.to(w.dtype)
    return gate, up, down


def upcycle_tensors(dense_config: dict, dense: dict[str, torch.Tensor], cfg: UpcycleConfig) -> dict[str, torch.Tensor]:
    """Canonical dense weights -> canonical MoE weights (see the module docstring for the construction)."""
    g = torch.Generator().manual_seed(cfg.seed)
    shared_half = cfg.shared == 1
    out = {}
    for name, t in dense.items():
        if ".dense_" not in name:
            out[name] = t
    layers = int(dense_config["num_hidden_layers"])
    hidden = int(dense_config["hidden_size"])
    for i in range(layers):
        p = f"layers.{i}."
        gate, up, down = (dense[p + f"dense_{part}"].float() for part in EXPERT_PARTS)
        routed_down = down * 0.5 if shared_half else down
        for e in range(cfg.experts):
            copy = drop_neurons(gate, up, routed_down, cfg.drop, g)
            for part, w in zip(EXPERT_PARTS, copy):
                out[canonical_expert(i, e, part)] = w
        out[p + "router"] = torch.randn(cfg.experts, hidden, generator=g) * cfg.router_std  # [E, H]
        if shared_half:
            for part, w in zip(EXPERT_PARTS, (gate, up, down)):
                out[p + f"shared_{part}"] = w.clone()
            out[p + "shared_expert_gate"] = torch.zeros(1, hidden)  # sigmoid(0) = 0.5
    return out


def upcycle(dense_dir: str, out_dir: str, cfg: UpcycleConfig, dtype: torch.dtype | None = None) -> dict:
    """Read a dense checkpoint, write the upcycled MoE checkpoint (+ tokenizer); returns a summary."""
    dense_model = TrainableDecoder.from_pretrained(dense_dir)
    dense_config = dense_model.config
    family_of(dense_config)
    cfg.validate(dense_config.get("model_type"))
    config = moe_config(dense_config, cfg)
    moe = TrainableDecoder(config, upcycle_tensors(dense_config, dense_model.canonical_state(), cfg))
    if dtype is None:
        dtype = getattr(torch, str(dense_config.get("dtype") or dense_config.get("torch_dtype") or "float32"))
    moe.save_pretrained(out_dir, dtype=dtype, tokenizer_from=dense_dir)
    total = sum(t.numel() for t in moe.parameters())
    return {"out": out_dir, "model_type": config["model_type"], "experts": cfg.experts, "shared": cfg.shared,
            "top_k": cfg.top_k, "drop": cfg.drop, "params_dense": sum(t.numel() for t in dense_model.parameters()),
            "params_moe": total}
