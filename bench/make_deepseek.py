"""A DeepSeek-V2-Lite-shaped bench model (multi-head latent attention, 64 routed experts top-6, 2 shared experts,
a dense first layer, greedy softmax routing), scaled down like bench/make_model.py's, bf16, random weights (seed 0);
with --gguf also the same model as a bf16 GGUF from llama.cpp's converter (arch deepseek2) for bench/bench.py.

    python bench/make_deepseek.py OUT [--gguf OUT.gguf --converter DIR] [--layers 12 --hidden 1024 ...]

Shape: DeepSeek-V2-Lite's (27 layers, hidden 2048, 16 heads, kv_lora_rank 512, qk 128 + 64, v 128, 64 experts of
1408, top-6, 2 shared, vocabulary 102400) with 12 layers, hidden 1024, expert FFN 384 (make_model.py's scale) and a
low-rank q (q_lora_rank 384: the llama.cpp in llama-cpp-python 0.3.36 loads a full-rank q only at V2-Lite's 26/27
layers). About 2.3 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--ffn", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=102400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", default=None, help="also write this bf16 GGUF with llama.cpp's converter")
    ap.add_argument("--converter", default=None, help="directory holding llama.cpp's convert_hf_to_gguf.py")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    from moepage.surgery.tokenizer_builder import build_tokenizer, local_corpus, save_tokenizer

    os.makedirs(a.out, exist_ok=True)
    eos = save_tokenizer(build_tokenizer(local_corpus(), 4096), a.out)["eos_token_id"]
    cfg = DeepseekV2Config(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=16,
        num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=384, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=a.experts, num_experts_per_tok=a.top_k, n_shared_experts=2,
        moe_intermediate_size=a.ffn, intermediate_size=3 * a.hidden, first_k_dense_replace=1, topk_method="greedy",
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=4096,
        eos_token_id=eos, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(a.seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.04)
    model.save_pretrained(a.out, max_shard_size="1GB")
    print(json.dumps({"out": a.out, "params": sum(p.numel() for p in model.parameters())}))
    if a.gguf:
        if not a.converter:
            sys.exit("--gguf needs --converter (the llama-cpp-python sdist's vendor/llama.cpp directory)")
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from gguf_support import CONVERT_WRAPPER  # the local tokenizer's pre-tokenizer hash is unknown to it

        subprocess.run([sys.executable, "-c", CONVERT_WRAPPER, a.converter, json.dumps([[a.out, a.gguf, "bf16"]])],
                       check=True, env=dict(os.environ, NO_LOCAL_GGUF="1"))


if __name__ == "__main__":
    main()
