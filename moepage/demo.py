"""The built-in demo model: a small random Qwen3-MoE checkpoint generated on first use (no transformers needed).

`demo_model_path()` returns a shipped trained model in moepage/demo_model/ when one exists, otherwise builds
(once, deterministically) and returns a generated one under the user cache directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moepage.engine.families import common

SHIPPED_DIR = Path(__file__).parent / "demo_model"
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class DemoSpec:
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    experts: int = 16
    top_k: int = 2
    moe_intermediate: int = 64
    vocab: int = 1024  # BPE merges; added/special tokens come on top
    max_position: int = 4096
    seed: int = 0
    init_std: float = 0.08
    lm_head_scale: float = 1.0  # < 1 makes logits small (tests steer such a model with logit_bias)
    extra_tokens: tuple[str, ...] = ()  # added tokens on top of the standard ones

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _config(spec: DemoSpec, vocab_size: int, eos_id: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab_size,
        "hidden_size": spec.hidden, "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim, "num_experts": spec.experts,
        "num_experts_per_tok": spec.top_k, "moe_intermediate_size": spec.moe_intermediate,
        "intermediate_size": spec.moe_intermediate * 4, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "max_position_embeddings": spec.max_position, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
        "bos_token_id": None, "eos_token_id": eos_id, "torch_dtype": "float32", "dtype": "float32",
        "moepage_demo": {"spec": asdict(spec), "note": "random weights: output is gibberish, for trying the API"},
    }


def _weights(spec: DemoSpec, vocab_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)

    def mat(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * spec.init_std * scale).contiguous()

    h, hd, q, kv = spec.hidden, spec.head_dim, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    names = {k: v for k, v in {**common.ATTENTION, **common.QWEN_MLP}.items()}
    out = {
        names["embed"]: mat(vocab_size, h),
        names["norm"]: torch.ones(h),
        names["lm_head"]: mat(vocab_size, h, scale=spec.lm_head_scale),
    }
    for layer in range(spec.layers):
        def name(key):
            return names[f"layers.{{L}}.{key}"].format(L=layer)

        out[name("attn_norm")] = torch.ones(h)
        out[name("ffn_norm")] = torch.ones(h)
        out[name("q")] = mat(q, h)
        out[name("k")] = mat(kv, h)
        out[name("v")] = mat(kv, h)
        out[name("o")] = mat(h, q)
        out[name("q_norm")] = torch.ones(hd)
        out[name("k_norm")] = torch.ones(hd)
        out[name("router")] = mat(spec.experts, h)
        for e in range(spec.experts):
            for part, shape in (("gate", (spec.moe_intermediate, h)), ("up", (spec.moe_intermediate, h)),
                                ("down", (h, spec.moe_intermediate))):
                out[common.QWEN_EXPERTS[part].format(L=layer, E=e)] = mat(*shape)
    return out


def build_demo_model(out_dir: str | os.PathLike, spec: DemoSpec = DemoSpec()) -> str:
    """Write config.json, model.safetensors and the tokenizer files into out_dir; returns out_dir."""
    from safetensors.torch import save_file

    from moepage.surgery.tokenizer_builder import build_tokenizer, local_corpus, save_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(local_corpus(400_000), vocab_size=spec.vocab)
    tok.add_special_tokens(list(FIM_TOKENS))
    if spec.extra_tokens:
        tok.add_tokens(list(spec.extra_tokens))
    info = save_tokenizer(tok, str(out))
    vocab_size = info["vocab_size"]
    (out / "config.json").write_text(json.dumps(_config(spec, vocab_size, info["eos_token_id"]), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": info["eos_token_id"]}))
    save_file(_weights(spec, vocab_size), str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def cache_root() -> Path:
    base = os.environ.get("MOEPAGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "moepage")
    return Path(base)


def demo_model_path(spec: DemoSpec | None = None) -> str:
    """The shipped trained demo model; with a spec (or when none is shipped), a generated one built once."""
    if spec is None and (SHIPPED_DIR / "config.json").exists():
        return str(SHIPPED_DIR)
    spec = spec or DemoSpec()
    target = cache_root() / f"demo-qwen3moe-{spec.digest()}"
    if (target / COMPLETE_MARKER).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=target.parent))
    try:
        build_demo_model(tmp, spec)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        if not (target / COMPLETE_MARKER).exists():  # nobody else finished it either
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
