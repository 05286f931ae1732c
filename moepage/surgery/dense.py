"""Merge each layer's kept experts into one dense SwiGLU FFN and write the family's dense architecture.

With the kept experts e_1..e_N of a layer and c_e the domain's average routing weight of expert e,
    MoE(x) = sum_e w_e(x) f_e(x)   is approximated by   sum_e c_e f_e(x)
which is one SwiGLU FFN whose intermediate is the experts' intermediates concatenated and whose down_proj
columns of expert e are scaled by c_e. It is exact when routing is constant on the domain (every token picks
exactly the kept experts with the same weights). Qwen2-MoE's shared expert joins the merge with its sigmoid
gate replaced by the domain's mean gate value (exact when the gate is constant, approximate otherwise).
Layers of different intermediate width are zero-padded to the widest (zero rows add exactly nothing).

Shape legend: H hidden, I expert intermediate, N kept experts, W merged (padded) intermediate.
"""
from __future__ import annotations

import copy
import os

import torch

from moepage.engine.checkpoint import Checkpoint
from moepage.engine.families import common
from moepage.progress import bar
from moepage.surgery.checkpoint_writer import ShardedWriter, copy_tokenizer, write_json

# Dense model_type -> transformers architecture. The dense block must be the MoE block with the FFN swapped:
# same pre-norm residual layout, attention, q/k norm and biases.
DENSE_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
UNSUPPORTED_REASON = {
    "olmoe": "OLMoE has no dense twin in transformers: OLMo-2 is post-norm (norms after attention/FFN) and OLMo-1 "
             "has no q/k norm or learned norms, so the merged weights would compute a different function. "
             "Extract a smaller OLMoE instead (drop --dense).",
}
MOE_CONFIG_KEYS = (
    "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "architectures",
)
DENSE_FFN = {part: common.QWEN_MLP[f"layers.{{L}}.dense_{part}"] for part in ("gate", "up", "down")}
_MOE_ONLY_PARTS = ("router", "shared_gate", "shared_up", "shared_down", "shared_expert_gate",
                   "dense_gate", "dense_up", "dense_down")


def dense_target(ckpt: Checkpoint) -> tuple[str, str]:
    """(dense model_type, architecture) for the checkpoint's family, or a clear error."""
    family = ckpt.args.family
    if family in UNSUPPORTED_REASON:
        raise ValueError(f"--dense is not supported for {family}: {UNSUPPORTED_REASON[family]}")
    model_type = ckpt.family.dense_model_type
    if model_type not in DENSE_ARCHITECTURES:
        raise ValueError(f"--dense is not supported for {family} (dense type {model_type!r} has no known architecture)")
    return model_type, DENSE_ARCHITECTURES[model_type]


def merge_layer_ffn(experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], scales: list[float]):
    """[(gate [I, H], up [I, H], down [H, I])] and one scale each -> merged (gate [NI, H], up [NI, H], down [H, NI])."""
    if len(experts) != len(scales):
        raise ValueError("one scale per expert")
    gate = torch.cat([g.float() for g, _, _ in experts], dim=0)
    up = torch.cat([u.float() for _, u, _ in experts], dim=0)
    down = torch.cat([d.float() * s for (_, _, d), s in zip(experts, scales)], dim=1)
    return gate, up, down


def pad_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, width: int):
    """Zero-pad the intermediate dimension to `width` (silu(0) * 0 = 0: the function is unchanged)."""
    extra = width - gate.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad intermediate {gate.shape[0]} down to {width}")
    if extra == 0:
        return gate, up, down
    H = gate.shape[1]
    z = gate.new_zeros(extra, H)
    return torch.cat([gate, z]), torch.cat([up, z]), torch.cat([down, down.new_zeros(down.shape[0], extra)], dim=1)


def dense_config(config: dict, model_type: str, architecture: str, intermediate: int) -> dict:
    out = {k: v for k, v in copy.deepcopy(config).items() if k not in MOE_CONFIG_KEYS}
    out["model_type"] = model_type
    out["architectures"] = [architecture]
    out["intermediate_size"] = intermediate
    if model_type == "qwen2":
        out.pop("qkv_bias", None)
    return out


def write_dense(ckpt: Checkpoint, kept: dict[int, list[int]], avg_gate: dict[int, list[float]],
                shared_gate: dict[int, float] | None, out_dir: str, max_shard_bytes: int | None = None) -> dict:
    """Merge kept experts (scaled by avg_gate[layer][expert]) into dense FFNs and write the dense checkpoint."""
    model_type, architecture = dense_target(ckpt)
    args, names = ckpt.args, ckpt.resident_checkpoint_names()
    if sorted(kept) != list(args.moe_layers):
        raise ValueError(f"experts to keep are given for layers {sorted(kept)}, the model's MoE layers are {args.moe_layers}")
    dtype = ckpt.read_tensor(names["embed"]).dtype
    ffns = {}
    for i in bar(range(args.num_layers), desc="merge experts", unit="layer"):
        p = f"layers.{i}."
        if not args.sparse_layers[i]:
            ffns[i] = tuple(ckpt.read_tensor(names[p + f"dense_{part}"]).float() for part in ("gate", "up", "down"))
            continue
        parts = [ckpt.experts.read(i, e) for e in kept[i]]
        weights = [(w.gate, w.up, w.down) for w in parts]
        scales = [float(avg_gate[i][e]) for e in kept[i]]
        if args.shared_expert_intermediate_size:
            g = 1.0
            if args.shared_expert_gate:
                if shared_gate is None or shared_gate.get(i) is None:
                    raise ValueError(f"layer {i}: the profile has no shared-expert gate average to merge the shared expert with")
                g = float(shared_gate[i])
            weights.append(tuple(ckpt.read_tensor(names[p + f"shared_{part}"]) for part in ("gate", "up", "down")))
            scales.append(g)
        ffns[i] = merge_layer_ffn(weights, scales)
    width = max(f[0].shape[0] for f in ffns.values())
    writer = ShardedWriter(out_dir, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
    for canonical, name in names.items():
        if canonical.split(".")[-1] in _MOE_ONLY_PARTS:
            continue
        writer.add(name, ckpt.read_tensor(name))
    if model_type == "qwen2" and not args.qkv_bias:  # Qwen2 always has q/k/v biases
        for i in range(args.num_layers):
            for part, rows in (("q", args.num_heads), ("k", args.num_kv_heads), ("v", args.num_kv_heads)):
                writer.add(common.ATTENTION[f"layers.{{L}}.{part}_bias"].format(L=i),
                           torch.zeros(rows * args.head_dim, dtype=dtype))
    for i in range(args.num_layers):
        for part, tensor in zip(("gate", "up", "down"), pad_ffn(*ffns[i], width)):
            writer.add(DENSE_FFN[part].format(L=i), tensor.to(dtype))
    files = writer.close()
    write_json(os.path.join(out_dir, "config.json"), dense_config(ckpt.config, model_type, architecture, width))
    copy_tokenizer(ckpt.root, out_dir)
    return {"kind": "dense", "model_type": model_type, "architecture": architecture, "intermediate_size": width,
            "files": files, "bytes": writer.total_bytes, "kept": {str(k): v for k, v in sorted(kept.items())}}
