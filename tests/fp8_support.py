"""FP8 checkpoints written the way DeepSeek-V3, Kimi K2 and the GLM FP8 repositories publish them: every linear
weight of the decoder layers (attention, dense MLP, shared and routed experts; not the router, embeddings, lm_head
or norms) as float8_e4m3fn with a float32 `<name>_scale_inv` of one scale per block of weight_block_size, and
`quantization_config: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [br, bc]}` in config.json.

Shape legend: R rows (output features), C columns (input features), br x bc a scale block.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

FP8_MAX = 448.0  # largest float8_e4m3fn value
LINEAR = re.compile(r"^model\.layers\.\d+\..*(?:_proj|\.w[123])\.weight$")  # the decoder layers' linear weights


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] -> (float8_e4m3fn [R, C], float32 scale_inv [ceil(R/br), ceil(C/bc)]): per block amax / 448, as
    DeepSeek's weight quantization does it (w = fp8 * scale_inv)."""
    R, C = w.shape
    br, bc = block
    gr, gc = -(-R // br), -(-C // bc)
    padded = torch.zeros(gr * br, gc * bc)
    padded[:R, :C] = w.float()
    blocks = padded.view(gr, br, gc, bc)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(1e-12)  # [gr, gc]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(gr * br, gc * bc)[:R, :C].contiguous(), scale.contiguous()


def write_fp8_checkpoint(src, out, block: tuple[int, int] = (32, 32)) -> str:
    """src (an HF safetensors directory) -> out with its decoder linear weights in block-scaled FP8, one shard per
    source shard, the index and config rewritten, tokenizer files copied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    weight_map = {}
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name.endswith(".safetensors"):
            tensors = {}
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if LINEAR.match(key) and t.dim() == 2:
                        tensors[key], tensors[key + "_scale_inv"] = quantize_blocks(t, block)
                    else:
                        tensors[key] = t
            save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in tensors})
        elif name == "config.json":
            config = json.load(open(path))
            config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": list(block)}
            json.dump(config, open(os.path.join(out, name), "w"), indent=2)
        elif name != "model.safetensors.index.json" and os.path.isfile(path):
            shutil.copy(path, os.path.join(out, name))
    total = sum(os.path.getsize(os.path.join(out, f)) for f in set(weight_map.values()))
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
    return str(out)


def dequantized_reference(path, dtype=torch.float32):
    """transformers' own FP8 loader on CPU: it dequantizes every FP8 weight (fp8 * scale_inv in float32, then dtype)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()
