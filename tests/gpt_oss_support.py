"""Tiny random gpt-oss checkpoints made with transformers in the published layout: float (fused experts with
biases, `self_attn.sinks`, `mlp.router.{weight,bias}`), and with MXFP4 experts written as the published checkpoints
store them (`*_blocks` + `*_scales`, quantization_config mxfp4), plus the transformers reference for each (for
MXFP4: the same model with the experts set to the dequantized values, transformers' own convert_moe_packed_tensors).

Shape legend: E experts, H hidden, I expert intermediate size, G blocks of 32 per row.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harmony_support import save_harmony_tokenizer
from qwen35_support import one_torch_thread  # noqa: F401  (the modules importing it from here run on one thread)
from moepage.kernels import mxfp4


EXPERT_PARTS = ("gate_up_proj", "down_proj")
QUANTIZATION = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def gpt_oss_config(vocab: int, eos: list[int], pad: int, **over):
    from transformers import GptOssConfig

    fields = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
                  max_position_embeddings=512, eos_token_id=eos, pad_token_id=pad, bos_token_id=None,
                  tie_word_embeddings=False)
    fields["rope_parameters"] = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "truncate": False, "original_max_position_embeddings": 64, "rope_theta": 150000.0}
    fields.update(over)  # YaRN with truncate false as published, the context scaled down with the model
    return GptOssConfig(**fields)


def random_model(cfg, seed: int, router_scale: float = 1.0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # off their init, so a wrong norm convention shows
            else:  # biases and sinks: non-zero
                p.normal_(0.0, 0.3)
        # rows of very different norms: decisive greedy choices (bf16 near-ties are rare), as trained models have
        model.lm_head.weight.mul_(torch.randn(cfg.vocab_size, 1).mul(0.7).exp())
        for layer in model.model.layers:  # router_scale > 1: decisive routing (rare near-ties between experts)
            layer.mlp.router.weight.mul_(router_scale)
    return model.eval()


def save_gpt_oss(out_dir, seed: int = 0, dtype=torch.float32, mxfp4_experts: bool = False, router_scale: float = 1.0,
                 **over) -> Path:
    """A tiny gpt-oss checkpoint (Harmony tokenizer and template) in out_dir."""
    out_dir = Path(out_dir)
    info = save_harmony_tokenizer(out_dir)
    cfg = gpt_oss_config(info["vocab_size"], info["eos_token_ids"], info["pad_token_id"], **over)
    model = random_model(cfg, seed, router_scale)
    if mxfp4_experts:
        with torch.no_grad():  # the experts on the MXFP4 grid, so the float model is the dequantized reference
            for layer in model.model.layers:
                for part in EXPERT_PARTS:
                    p = getattr(layer.mlp.experts, part)
                    p.copy_(dequantized(*quantized(p.data)))
    model.to(dtype).save_pretrained(out_dir)
    if mxfp4_experts:
        write_mxfp4_experts(out_dir, model)
    return out_dir


def quantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' in-memory expert tensor [E, C, R] (x @ w) -> published (blocks [E, R, G, 16], scales [E, R, G])."""
    return mxfp4.quantize(w.transpose(1, 2))


def dequantized(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, C, R]


def write_mxfp4_experts(out_dir: Path, model) -> None:
    """Replace the float expert tensors of the saved checkpoint by their MXFP4 blocks and scales, as published."""
    path = out_dir / "model.safetensors"
    tensors = load_file(str(path))
    for i, layer in enumerate(model.model.layers):
        for part in EXPERT_PARTS:
            name = f"model.layers.{i}.mlp.experts.{part}"
            blocks, scales = quantized(getattr(layer.mlp.experts, part).data.float())
            assert torch.equal(dequantized(blocks, scales), getattr(layer.mlp.experts, part).data.float())
            del tensors[name]
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, str(path), metadata={"format": "pt"})
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = QUANTIZATION
    cfg_path.write_text(json.dumps(cfg, indent=2))


def reference(path, dtype=torch.float32):
    """The transformers model of a checkpoint save_gpt_oss wrote (an MXFP4 one: experts dequantized)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg = AutoConfig.from_pretrained(path)
    if getattr(cfg, "quantization_config", None):
        del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
        tensors = load_file(str(path / "model.safetensors"))
        state = {}
        for name, t in tensors.items():
            if name.endswith("_blocks"):
                base = name[: -len("_blocks")]
                state[base] = dequantized(t, tensors[base + "_scales"])
            elif not name.endswith("_scales"):
                state[name] = t
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
        return model.to(dtype).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()
