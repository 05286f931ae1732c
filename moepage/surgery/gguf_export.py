"""Write a Hugging Face checkpoint directory (an extract/prune result, MoE or dense) as one GGUF file.

Weight names come from the tables the GGUF loader reads (moepage/engine/families/common.py GGUF / GGUF_EXPERTS):
a family's checkpoint names -> canonical names -> llama.cpp names, so there is one table, not two. Metadata is
what llama.cpp's convert_hf_to_gguf.py writes for the same architecture (and what moepage/engine/gguf_config.py
and gguf_tokenizer.py read back):

  MoE:   qwen3_moe -> qwen3moe, qwen2_moe -> qwen2moe, mixtral -> llama (+ experts), olmoe -> olmoe
  dense: qwen3 -> qwen3, qwen2 -> qwen2, mistral / llama -> llama

Conventions kept from the converter: llama-architecture q/k rows are permuted to llama.cpp's interleaved rotary
layout; 1-D tensors, norms and routers are F32; routed experts are one 3-D tensor per layer and part
([E, I, H] gate/up, [E, H, I] down); qwen2moe and olmoe always get an `output.weight` (llama.cpp requires it)
that is the embedding when the model ties them. Tensors are written one at a time (two passes over the weights:
sizes first, then data), so a large model needs memory for one layer's experts, not for the whole file.

Shape legend: E experts, I expert intermediate, H hidden, N heads.
"""
from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from moepage.engine.families import FAMILIES, GGUF_FAMILIES, common, dense_twin_of
from moepage.engine.gguf_tokenizer import CONTROL, LLAMA3_SPLIT, NORMAL, QWEN2_SPLIT, UNUSED, USER_DEFINED
from moepage.engine.weight_names import resident_names, to_checkpoint
from moepage.progress import bar

DENSE_ARCH = {"qwen3": "qwen3", "qwen2": "qwen2", "mistral": "llama", "llama": "llama"}
OUTPUT_REQUIRED = {"qwen2moe", "olmoe"}  # llama.cpp loads output.weight with no fallback to the embedding
GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")
_PARTS = ("gate", "up", "down")


class GGUFExportError(ValueError):
    pass


@dataclass
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # logical, PyTorch order
    load: Callable[[], torch.Tensor]
    source_dtype: torch.dtype
    force_f32: bool = False


# ---- model ---------------------------------------------------------------------------------------------

def _read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise GGUFExportError(f"{model_dir}: no config.json")
    with open(path) as f:
        return json.load(f)


def _dense_args(config: dict):
    """ModelArgs of a dense model through the family whose dense twin it is (all layers dense)."""
    model_type = config.get("model_type")
    family = dense_twin_of(model_type)
    if family is None:
        raise GGUFExportError(f"no GGUF writer for dense model_type {model_type!r}")
    zero = {"num_experts": 0, "num_local_experts": 0, "num_experts_per_tok": 1, "moe_intermediate_size": 0}
    args = family.model_args({**config, **zero})
    return family, replace(args, sparse_layers=[False] * args.num_layers)


class _SafetensorsReader:
    """name -> tensor over every *.safetensors file of a directory (lazy; for dense results)."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
        if not files:
            raise GGUFExportError(f"{model_dir}: no *.safetensors weight files")
        self.handles = [safe_open(f, framework="pt") for f in files]
        self.where = {n: h for h in self.handles for n in h.keys()}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise GGUFExportError(f"tensor {name!r} is missing from the checkpoint")
        return self.where[name].get_tensor(name)


def _permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF half-split rotary rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf LlamaModel.permute);
    the inverse of moepage.engine.gguf_checkpoint.unpermute_qk."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _plan_tensors(model_dir: str, config: dict) -> tuple[str, object, list[_Tensor], bool]:
    """(gguf arch, ModelArgs, tensors in file order, is_moe)."""
    model_type = config.get("model_type")
    spec = FAMILIES.get(model_type)
    if spec is not None and spec.expert_source is not None:
        raise GGUFExportError(f"model_type {model_type!r} keeps its experts fused per layer (with biases): export "
                              f"it with llama.cpp's convert_hf_to_gguf.py")
    if spec is not None and "linear_attention" in spec.mixers:
        raise GGUFExportError(f"model_type {model_type!r}: moepage's GGUF writer has no tables for linear-attention "
                              "(Gated DeltaNet) layers; convert with llama.cpp's convert_hf_to_gguf.py --no-mtp")
    if spec is not None and "mla" in spec.mixers:
        raise GGUFExportError(f"model_type {model_type!r}: moepage's GGUF writer has no tables for multi-head latent "
                              "attention layers; convert with llama.cpp's convert_hf_to_gguf.py (arch deepseek2)")
    if spec is not None and spec.gguf_arch:
        from moepage.engine.checkpoint import open_checkpoint

        ckpt = open_checkpoint(model_dir)
        args, arch = ckpt.args, spec.gguf_arch
        read = ckpt.read_tensor
        names = ckpt.resident_checkpoint_names()
    elif model_type in DENSE_ARCH:
        family, args = _dense_args(config)
        arch, ckpt = DENSE_ARCH[model_type], None
        read = _SafetensorsReader(model_dir)
        names = {c: to_checkpoint({**family.names, **common.QWEN_MLP}, c) for c in resident_names(args)}
    else:
        known = [t for t, f in FAMILIES.items() if f.gguf_arch] + list(DENSE_ARCH)
        raise GGUFExportError(f"no GGUF architecture for model_type {model_type!r}; supported: "
                              f"{', '.join(sorted(known))}")
    llama = arch == "llama"
    plan: list[_Tensor] = []

    def add(canonical: str, ckpt_name: str, transform=None):
        gname = to_checkpoint(common.GGUF, canonical)

        def load(n=ckpt_name, t=transform):
            x = read(n)
            return t(x) if t else x

        x = read(ckpt_name)  # shape and dtype now, the data again when it is written (one tensor in memory)
        short = canonical.rsplit(".", 1)[-1]
        plan.append(_Tensor(gname, tuple(x.shape), load, x.dtype,
                            force_f32=x.dim() < 2 or short.endswith("norm") or short in ("router", "shared_expert_gate")))

    order = ["embed"] + [c for c in names if c not in ("embed", "norm", "lm_head")] + ["norm"]
    for canonical in order:
        transform = None
        m = canonical.split(".")
        if llama and len(m) == 3 and m[2] in ("q", "k"):
            heads = args.num_heads if m[2] == "q" else args.num_kv_heads
            transform = lambda x, h=heads: _permute_qk(x, h)  # noqa: E731
        add(canonical, names[canonical], transform)
        if ckpt is not None and canonical.endswith(".router"):
            layer = int(m[1])
            for part in _PARTS:
                plan.append(_expert_stack(ckpt, args, layer, part))
    if "lm_head" in names:
        add("lm_head", names["lm_head"])
    elif arch in OUTPUT_REQUIRED:  # tied embeddings: llama.cpp's graph still wants output.weight
        add("lm_head", names["embed"])
    return arch, args, plan, ckpt is not None


def _expert_stack(ckpt, args, layer: int, part: str) -> _Tensor:
    first = getattr(ckpt.experts.read(layer, 0), part)

    def load():
        return torch.stack([getattr(ckpt.experts.read(layer, e), part) for e in range(args.num_experts)])

    return _Tensor(common.GGUF_EXPERTS[part].format(L=layer), (args.num_experts, *first.shape), load, first.dtype)


# ---- metadata ------------------------------------------------------------------------------------------

def _hparams(writer, arch: str, args, config: dict, moe: bool, notes: list[str]):
    writer.add_context_length(int(args.max_position_embeddings))
    writer.add_embedding_length(args.hidden_size)
    writer.add_block_count(args.num_layers)
    ffn = int(config.get("intermediate_size") or 0)
    if arch == "llama" and moe:
        ffn = args.moe_intermediate_size
    if ffn:
        writer.add_feed_forward_length(ffn)
    writer.add_head_count(args.num_heads)
    writer.add_head_count_kv(args.num_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    if arch == "llama":
        writer.add_vocab_size(args.vocab_size)
        writer.add_rope_dimension_count(args.head_dim)
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("linear", "yarn"):
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings") or 0))
    elif kind not in (None, "default"):
        raise GGUFExportError(f"rope scaling {kind!r} has no GGUF writer here")
    if args.sliding_window:
        notes.append(f"sliding window {args.sliding_window} is not expressible for GGUF architecture {arch}; "
                     "llama.cpp attends to the full context")
    if args.clip_qkv:
        writer.add_clamp_kqv(float(args.clip_qkv))
    if moe:
        writer.add_expert_count(args.num_experts)
        writer.add_expert_used_count(args.top_k)
        norm = bool(args.routing.norm_topk_prob)
        writer.add_expert_weights_norm(norm)  # moepage reads it; llama.cpp may not (FamilySpec.gguf_norm_topk_fixed)
        spec = GGUF_FAMILIES.get(arch)
        if spec is not None and spec.gguf_norm_topk_fixed and spec.gguf_norm_topk != norm \
                and args.top_k < args.num_experts:
            notes.append(f"norm_topk_prob={norm} but llama.cpp's {arch} graph always uses "
                         f"{spec.gguf_norm_topk}: llama.cpp will compute a different function from this file "
                         "(moepage reads expert_weights_norm and stays exact)")
        if arch in ("qwen3moe", "qwen2moe"):
            writer.add_expert_feed_forward_length(args.moe_intermediate_size)
        if arch == "qwen2moe" and args.shared_expert_intermediate_size:
            writer.add_expert_shared_feed_forward_length(args.shared_expert_intermediate_size)
        if not all(args.sparse_layers):
            notes.append(f"layers {[i for i, s in enumerate(args.sparse_layers) if not s]} are dense: moepage serves "
                         f"this file, llama.cpp's {arch} graph expects every layer to be sparse")


def _pre_tokenizer_name(pre: dict | None, path: str) -> str:
    """tokenizer.json pre_tokenizer -> llama.cpp's tokenizer.ggml.pre (the inverse of gguf_tokenizer.PRE_SPLITS)."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True)):
            regex = (steps[0].get("pattern") or {}).get("Regex")
            for split, name in ((QWEN2_SPLIT, "qwen2"), (LLAMA3_SPLIT, "llama-bpe")):
                if regex == split:
                    return name
    raise GGUFExportError(f"{path}: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name here "
                          "(supported: GPT-2 byte-level, Qwen2 and Llama-3 split regexes)")


def tokenizer_metadata(model_dir: str, vocab_size: int, config: dict) -> dict:
    """The tokenizer.* keys llama.cpp and moepage's gguf_tokenizer read, from tokenizer.json/_config.json."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise GGUFExportError(f"{model_dir}: no tokenizer.json; a GGUF file carries its tokenizer")
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError(f"{path}: only byte-level BPE tokenizers (GPT-2 / Qwen / Llama-3 style) are written to GGUF")
    if tj.get("normalizer") not in (None, {"type": "NFC"}):
        raise GGUFExportError(f"{path}: normalizer {tj['normalizer']} is not representable in GGUF")
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size
    for tok, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = tok, NORMAL
    for added in tj.get("added_tokens") or []:
        i = added["id"]
        if i < vocab_size:
            tokens[i] = added["content"]
            types[i] = CONTROL if added.get("special") else USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tcfg = {}
    tcfg_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(tcfg_path):
        with open(tcfg_path, encoding="utf-8") as f:
            tcfg = json.load(f)
    index = {t: i for i, t in enumerate(tokens)}

    def token_id(key: str, config_key: str):
        value = tcfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in index:
            return index[value]
        ids = config.get(config_key)
        if isinstance(ids, list):
            ids = ids[0] if ids else None
        return ids if isinstance(ids, int) else None

    meta = {
        "model": "gpt2", "pre": _pre_tokenizer_name(tj.get("pre_tokenizer"), path), "tokens": tokens,
        "token_types": types, "merges": merges, "bos": token_id("bos_token", "bos_token_id"),
        "eos": token_id("eos_token", "eos_token_id"), "pad": token_id("pad_token", "pad_token_id"),
        "add_bos": bool(tcfg.get("add_bos_token", False)), "chat_template": tcfg.get("chat_template"),
    }
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if meta["chat_template"] is None and os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            meta["chat_template"] = f.read()
    if isinstance(meta["chat_template"], list):  # [{"name": "default", "template": ...}, ...]
        meta["chat_template"] = next((t["template"] for t in meta["chat_template"] if t.get("name") == "default"),
                                     meta["chat_template"][0]["template"])
    return meta


def _tokenizer(writer, meta: dict):
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("pad", writer.add_pad_token_id)):
        if meta[key] is not None:
            add(meta[key])
    writer.add_add_bos_token(meta["add_bos"])
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


# ---- tensors -------------------------------------------------------------------------------------------

def _qtype(t: _Tensor, out_type: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if t.force_f32:
        return Q.F32
    if out_type == "auto":
        return {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}.get(t.source_dtype, Q.F32)
    q = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]
    block, _ = gguf.GGML_QUANT_SIZES[q]
    return q if t.shape[-1] % block == 0 else Q.F16  # the converter's fallback for rows a block does not divide


def _file_type(out_type: str, plan: list[_Tensor]) -> int:
    import gguf

    F = gguf.LlamaFileType
    if out_type == "auto":
        dtypes = {t.source_dtype for t in plan if not t.force_f32}
        out_type = "bf16" if dtypes == {torch.bfloat16} else "f16" if dtypes == {torch.float16} else "f32"
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[out_type].value


def _encode(x: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(x.detach().to(torch.float32).contiguous().numpy(), qtype)


def write_gguf(model_dir: str, out_path: str, out_type: str = "auto", name: str | None = None) -> dict:
    """Write model_dir (HF safetensors, MoE or dense) as the GGUF file out_path; returns a summary dict."""
    import gguf

    if out_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {out_type!r}; choose from {', '.join(GGUF_TYPES)}")
    config = _read_config(model_dir)
    arch, args, plan, moe = _plan_tensors(model_dir, config)
    tok = tokenizer_metadata(model_dir, args.vocab_size, config)
    notes: list[str] = []
    tmp = out_path + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or os.path.basename(os.path.normpath(model_dir)))
        writer.add_file_type(_file_type(out_type, plan))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(writer, arch, args, config, moe, notes)
        _tokenizer(writer, tok)
        qtypes = [_qtype(t, out_type) for t in plan]
        for t, q in zip(plan, qtypes):
            if q in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if q == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), math.prod(t.shape) * np.dtype(dtype).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(t.shape, q)
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=q)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, q in bar(zip(plan, qtypes), desc=f"write {os.path.basename(out_path)}", total=len(plan), unit="tensor"):
            data = _encode(t.load(), q)
            if data.shape != t.shape and q in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise GGUFExportError(f"{t.name}: shape {data.shape} != planned {t.shape}")
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"path": out_path, "architecture": arch, "tensors": len(plan), "bytes": os.path.getsize(out_path),
            "type": out_type, "notes": notes}
