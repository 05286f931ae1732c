"""A gpt-oss-shaped bench model with MXFP4 experts, written as the published checkpoints store it (safetensors
`*_blocks` / `*_scales`, quantization_config mxfp4) and, with --gguf, converted by llama.cpp's convert_hf_to_gguf.py
(MXFP4 experts kept MXFP4). Random weights, written tensor by tensor (no float copy of the experts is ever made).

    python bench/make_gpt_oss.py OUT_DIR [--layers 12] [--experts 32] [--top-k 4] [--hidden 1024] [--gguf]

Default shape: gpt-oss-20b's structure scaled down (24 -> 12 layers, hidden and expert width 2880 -> 1024, 64/8
heads -> 16/4 of 64 dims), 32 experts, top-4, sliding window 128 alternating with full attention.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def tensors(cfg: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    N, G, D, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]

    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).bfloat16()

    out = {"model.embed_tokens.weight": w(V, H), "lm_head.weight": w(V, H), "model.norm.weight": w(H, std=0.1) + 1}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": w(H, std=0.1) + 1, p + "post_attention_layernorm.weight": w(H, std=0.1) + 1,
                p + "self_attn.q_proj.weight": w(N * D, H), p + "self_attn.q_proj.bias": w(N * D),
                p + "self_attn.k_proj.weight": w(G * D, H), p + "self_attn.k_proj.bias": w(G * D),
                p + "self_attn.v_proj.weight": w(G * D, H), p + "self_attn.v_proj.bias": w(G * D),
                p + "self_attn.o_proj.weight": w(H, N * D), p + "self_attn.o_proj.bias": w(H),
                p + "self_attn.sinks": w(N, std=1.0),
                p + "mlp.router.weight": w(E, H, std=0.2), p + "mlp.router.bias": w(E, std=0.2),
                p + "mlp.experts.gate_up_proj_bias": w(E, 2 * I), p + "mlp.experts.down_proj_bias": w(E, H)}
        for part, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            out[p + f"mlp.experts.{part}_blocks"] = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8,
                                                                  generator=g)
            out[p + f"mlp.experts.{part}_scales"] = torch.randint(118, 123, (E, rows, cols // 32), dtype=torch.uint8,
                                                                  generator=g)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--gguf", action="store_true", help="also convert it with llama.cpp's converter (bf16 + MXFP4)")
    a = ap.parse_args()
    from harmony_support import save_harmony_tokenizer
    from transformers import GptOssConfig

    os.makedirs(a.out, exist_ok=True)
    info = save_harmony_tokenizer(a.out)
    cfg = GptOssConfig(vocab_size=info["vocab_size"], hidden_size=a.hidden, intermediate_size=a.hidden,
                       num_hidden_layers=a.layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                       num_local_experts=a.experts, num_experts_per_tok=a.top_k, sliding_window=128,
                       max_position_embeddings=4096, eos_token_id=info["eos_token_ids"], pad_token_id=info["pad_token_id"],
                       bos_token_id=None, tie_word_embeddings=False, dtype="bfloat16",
                       rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "truncate": False, "original_max_position_embeddings": 128,
                                        "rope_theta": 150000.0})
    config = cfg.to_dict()
    config["architectures"] = ["GptOssForCausalLM"]
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors(config, torch.Generator().manual_seed(0)), os.path.join(a.out, "model.safetensors"),
              metadata={"format": "pt"})
    print(f"wrote {a.out}")
    if a.gguf:
        from gguf_support import convert, find_converter

        out = os.path.join(a.out, "gpt-oss-mxfp4.gguf")
        convert(find_converter(os.path.join(a.out, ".converter")), [(a.out, out, "bf16")])
        print(f"wrote {out} ({os.path.getsize(out) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
