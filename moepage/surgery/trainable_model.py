"""A differentiable twin of moepage's decoder for training dense Qwen2/Qwen3 and Qwen2-MoE/Qwen3-MoE checkpoints.

Why not transformers' modeling classes: training must not need transformers (only tests compare against it),
its v5 MoE blocks fuse every expert of a layer into one tensor (our checkpoints store one tensor per expert),
and computing the very same math as the serving path (engine Router; moepage/kernels: rms_norm, rope, swiglu) makes
"what we trained is what we serve" a test (test_train.py compares these logits with Engine.logits_all).

Parameters are keyed by moepage canonical names ("layers.3.q", "layers.3.experts.2.gate"); the family tables in
moepage/engine/families translate them to checkpoint names when reading and writing.

Shape legend: B batch rows, T tokens per row, H hidden, N query heads, G kv heads, D head dim, V vocab,
E routed experts, K experts per token, I intermediate size.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moepage.engine.families import FAMILIES, dense_twin_of
from moepage.engine.model_args import ModelArgs
from moepage.engine.router import Router
from moepage.engine.weight_names import expert_names, resident_names, to_checkpoint
from moepage.kernels.experts import swiglu
from moepage.kernels.norm import rms_norm
from moepage.kernels.rope import RotaryTable, apply_rope

EXPERT_PARTS = ("gate", "up", "down")
TRAINABLE_MODEL_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def family_of(config: dict):
    """(family module, is_dense) for a dense or MoE Qwen config."""
    model_type = config.get("model_type")
    if model_type in FAMILIES and model_type in TRAINABLE_MODEL_TYPES:
        return FAMILIES[model_type], False
    twin = dense_twin_of(model_type)
    if twin is not None and model_type in TRAINABLE_MODEL_TYPES:
        return twin, True
    raise ValueError(f"model_type {model_type!r} is not trainable here; supported: {', '.join(TRAINABLE_MODEL_TYPES)}")


def model_args_for(config: dict) -> ModelArgs:
    """ModelArgs for a dense Qwen2/Qwen3 config (all layers dense) or a Qwen2-MoE/Qwen3-MoE config."""
    family, dense = family_of(config)
    if dense:
        config = {**config, "num_experts": 0, "num_experts_per_tok": 1, "moe_intermediate_size": 0}
    return family.model_args(config)


def canonical_expert(layer: int, expert: int, part: str) -> str:
    return f"layers.{layer}.experts.{expert}.{part}"


def checkpoint_names(config: dict, args: ModelArgs) -> dict[str, str]:
    """canonical -> checkpoint name for every tensor of the model, routed experts included."""
    family, _ = family_of(config)
    names = {c: to_checkpoint(family.names, c) for c in resident_names(args)}
    for layer in args.moe_layers:
        for e in range(args.num_experts):
            for part, name in expert_names(family.expert_names, layer, e).items():
                names[canonical_expert(layer, e, part)] = name
    return names


def read_checkpoint(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, {checkpoint name: tensor}) of a Hugging Face safetensors directory."""
    from safetensors.torch import load_file

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    with open(config_path) as f:
        config = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return config, tensors


def _key(canonical: str) -> str:
    return canonical.replace(".", "__")  # nn.ParameterDict keys cannot contain dots


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, T, V]
    router_logits: list[torch.Tensor]  # one [B*T, E] per MoE layer, in layer order
    routed_indices: list[torch.Tensor]  # one [B*T, K] per MoE layer


class TrainableDecoder(nn.Module):
    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]):
        """tensors: canonical name -> tensor (any dtype; parameters are float32)."""
        super().__init__()
        self.config = config
        self.args = model_args_for(config)
        missing = [c for c in checkpoint_names(config, self.args) if c not in tensors]
        if missing:
            raise ValueError(f"missing weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self.params = nn.ParameterDict(
            {_key(c): nn.Parameter(tensors[c].detach().float().clone()) for c in checkpoint_names(config, self.args)}
        )
        a = self.args
        self.rope = RotaryTable(a.head_dim, a.rope_theta, a.rope_scaling, torch.float32, "cpu")

    # ---- io -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str) -> "TrainableDecoder":
        config, stored = read_checkpoint(path)
        names = checkpoint_names(config, model_args_for(config))
        missing = [n for n in names.values() if n not in stored]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {', '.join(missing[:5])}")
        return cls(config, {c: stored[n] for c, n in names.items()})

    def p(self, canonical: str) -> torch.Tensor:
        return self.params[_key(canonical)]

    def has(self, canonical: str) -> bool:
        return _key(canonical) in self.params

    def canonical_state(self) -> dict[str, torch.Tensor]:
        return {c: self.p(c).detach() for c in checkpoint_names(self.config, self.args)}

    def save_pretrained(self, out_dir: str, dtype: torch.dtype = torch.float32, tokenizer_from: str | None = None):
        """Write config.json + model.safetensors (+ tokenizer files copied from tokenizer_from)."""
        from moepage.surgery.checkpoint_writer import ShardedWriter, copy_tokenizer, write_json

        os.makedirs(out_dir, exist_ok=True)
        writer = ShardedWriter(out_dir)
        for canonical, name in checkpoint_names(self.config, self.args).items():
            writer.add(name, self.p(canonical).detach().to(dtype))
        writer.close()
        config = dict(self.config)
        config["torch_dtype"] = config["dtype"] = str(dtype).replace("torch.", "")
        write_json(os.path.join(out_dir, "config.json"), config)
        if tokenizer_from:
            copy_tokenizer(tokenizer_from, out_dir)

    # ---- forward --------------------------------------------------------------------------------
    def _attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] (normed) -> [B, T, H]."""
        a, p = self.args, f"layers.{i}."
        B, T, _ = x.shape
        bias = (lambda n: self.p(p + n) if self.has(p + n) else None)  # noqa: E731
        q = F.linear(x, self.p(p + "q"), bias("q_bias")).view(B, T, a.num_heads, a.head_dim)
        k = F.linear(x, self.p(p + "k"), bias("k_bias")).view(B, T, a.num_kv_heads, a.head_dim)
        v = F.linear(x, self.p(p + "v"), bias("v_bias")).view(B, T, a.num_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q = rms_norm(q, self.p(p + "q_norm"), a.rms_norm_eps)
            k = rms_norm(k, self.p(p + "k_norm"), a.rms_norm_eps)
        elif a.qk_norm is not None:
            raise ValueError(f"qk_norm {a.qk_norm!r} is not supported by the trainer")
        cos, sin = self.rope.get(0, T)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, N, T, D]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, G, T, D]
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=a.head_dim**-0.5,
                                             enable_gqa=a.num_heads != a.num_kv_heads)
        out = out.transpose(1, 2).reshape(B, T, a.num_heads * a.head_dim)
        return F.linear(out, self.p(p + "o"), bias("o_bias"))

    def _moe(self, i: int, x: torch.Tensor, routing_override=None):
        """x [BT, H] -> (out [BT, H], router logits [BT, E], indices [BT, K])."""
        a, p = self.args, f"layers.{i}."
        router = Router(self.p(p + "router"), a.routing)
        logits = router.logits(x)  # [BT, E]
        weights, indices = router.select(logits) if routing_override is None else routing_override(i, logits)
        out = torch.zeros_like(x)
        for e in range(a.num_experts):
            tok, slot = (indices == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            w = [self.p(canonical_expert(i, e, part)) for part in EXPERT_PARTS]
            h = swiglu(x[tok], *w) * weights[tok, slot, None]  # [t, H]
            out = out.index_add(0, tok, h.to(out.dtype))
        if a.shared_expert_intermediate_size:
            shared = swiglu(x, self.p(p + "shared_gate"), self.p(p + "shared_up"), self.p(p + "shared_down"))
            if a.shared_expert_gate:
                shared = torch.sigmoid(F.linear(x, self.p(p + "shared_expert_gate"))) * shared
            out = out + shared
        return out, logits, indices

    def forward(self, ids: torch.Tensor, routing_override=None) -> ForwardOutput:
        """ids [B, T] -> logits [B, T, V] and each MoE layer's router logits.

        routing_override(layer, router_logits [BT, E]) -> (weights [BT, K'], indices [BT, K']) replaces the Router's
        selection (probe uses it for elastic-serving modes).
        """
        a = self.args
        B, T = ids.shape
        h = F.embedding(ids, self.p("embed"))  # [B, T, H]
        router_logits, routed = [], []
        for i in range(a.num_layers):
            p = f"layers.{i}."
            h = h + self._attention(i, rms_norm(h, self.p(p + "attn_norm"), a.rms_norm_eps))
            r = rms_norm(h, self.p(p + "ffn_norm"), a.rms_norm_eps)
            if a.sparse_layers[i]:
                out, logits, indices = self._moe(i, r.reshape(B * T, -1), routing_override)
                router_logits.append(logits)
                routed.append(indices)
                h = h + out.view(B, T, -1)
            else:
                h = h + swiglu(r, self.p(p + "dense_gate"), self.p(p + "dense_up"), self.p(p + "dense_down"))
        head = self.p("embed") if a.tie_word_embeddings else self.p("lm_head")
        logits = F.linear(rms_norm(h, self.p("norm"), a.rms_norm_eps), head)  # [B, T, V]
        return ForwardOutput(logits, router_logits, routed)
