"""Generate the bench model reproducibly: Qwen3-MoE shape scaled to fit (DESIGN.md, "What is measured").

12 layers, 64 experts, top-8, hidden 1024, expert FFN 384, vocabulary 151936, bf16, seed 0 (about 2.5 GB).
Tokenizer: the real Qwen2 tokenizer from llama-cpp-python's sdist (models/ggml-vocab-qwen2.gguf) when
--vocab-gguf is given, otherwise moepage's locally trained byte-level BPE (ids past its vocabulary are unused).

    python bench/make_model.py OUT [--vocab-gguf PATH] [--gguf OUT.gguf --converter DIR] [--layers 12 ...]

    python bench/make_model.py --shape qwen3-30b-a3b --quant Q4_K_M --synthetic OUT.gguf --vocab-gguf PATH
        [--routing skewed]   # a full-shape GGUF written directly (bench/synthetic_gguf.py), no bf16 step

    python bench/make_model.py OUT --family qwen3_5_moe   # Qwen3.5/3.6-MoE shape at the same scale: 9 Gated
        # DeltaNet + 3 gated-attention layers (3:1, as 35B-A3B), DeltaNet heads 8 key / 16 value x 128, shared expert

    python bench/make_model.py OUT --family deepseek_v2   # DeepSeek-V2-Lite's shape at the same scale (MLA, top-6 of
        # 64, 2 shared experts, a dense first layer, vocabulary 102400; bench/make_deepseek.py tells the rest)

--gguf also writes the same model as a bf16 GGUF with llama.cpp's own converter (convert_hf_to_gguf.py from the
llama-cpp-python sdist's vendor/llama.cpp, given as --converter; through tests/gguf_support.py's wrapper, which takes
the local tokenizer's pre-tokenizer for GPT-2's), for the llama.cpp side of bench/bench.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main():
    if "--synthetic" in sys.argv[1:]:  # --shape S --quant Q --synthetic OUT.gguf: bench/synthetic_gguf.py writes it
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import synthetic_gguf

        argv = sys.argv[1:]
        i = argv.index("--synthetic")
        return synthetic_gguf.main([*argv[i + 1 : i + 2], *argv[:i], *argv[i + 2 :]])
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=None, help="default: 8 (deepseek_v2: 6)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=None, help="default: 151936 (deepseek_v2: 102400)")
    ap.add_argument("--vocab-gguf", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", default=None, help="also write this bf16 GGUF with llama.cpp's converter")
    ap.add_argument("--converter", default=None, help="directory holding llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--family", choices=sorted(CONFIGS), default="qwen3_moe")
    a = ap.parse_args()
    deepseek = a.family == "deepseek_v2"
    a.top_k = a.top_k or (6 if deepseek else 8)
    a.vocab = a.vocab or (102400 if deepseek else 151936)
    if a.gguf and not a.converter:
        sys.exit("--gguf needs --converter (the llama-cpp-python sdist's vendor/llama.cpp directory)")
    from transformers import AutoModelForCausalLM

    os.makedirs(a.out, exist_ok=True)
    eos = None
    if a.vocab_gguf:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(a.vocab_gguf), gguf_file=os.path.basename(a.vocab_gguf))
        tok.save_pretrained(a.out)
        eos = tok.convert_tokens_to_ids("<|im_end|>")
    else:
        from moepage.surgery.tokenizer_builder import build_tokenizer, local_corpus, save_tokenizer

        eos = save_tokenizer(build_tokenizer(local_corpus(), 4096), a.out)["eos_token_id"]
    cfg = CONFIGS[a.family](a, eos)
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
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from gguf_support import convert

        mtp = ("--no-mtp",) if a.family == "qwen3_5_moe" else ()  # the converter expects an MTP head otherwise
        convert(a.converter, [(a.out, a.gguf, "bf16")], extra=mtp, timeout=None)


def qwen3_moe_config(a, eos):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=16,
        num_key_value_heads=4, head_dim=128, num_experts=a.experts, num_experts_per_tok=a.top_k,
        moe_intermediate_size=a.ffn, intermediate_size=3 * a.hidden, max_position_embeddings=4096,
        norm_topk_prob=True, eos_token_id=eos, tie_word_embeddings=False, rope_theta=1e6,
    )


def qwen3_5_config(a, eos):
    """The text-only Qwen3.5-MoE layout (Qwen3_5MoeForCausalLM) at the bench model's scale."""
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, linear_num_key_heads=8, linear_num_value_heads=16,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=a.experts,
        num_experts_per_tok=a.top_k, moe_intermediate_size=a.ffn, shared_expert_intermediate_size=a.ffn,
        max_position_embeddings=4096, eos_token_id=eos, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    )



def deepseek_v2_config(a, eos):
    """DeepSeek-V2-Lite's attention (16 heads, kv_lora_rank 512, qk 128 + 64, v 128) with a low-rank q (q_lora_rank
    384: the llama.cpp in llama-cpp-python 0.3.36 loads a full-rank q only at V2-Lite's 26/27 layers), greedy
    softmax routing over one group, 2 shared experts, a dense first layer."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=16,
        num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=384, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=a.experts, num_experts_per_tok=a.top_k, n_shared_experts=2,
        moe_intermediate_size=a.ffn, intermediate_size=3 * a.hidden, first_k_dense_replace=1, topk_method="greedy",
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=4096,
        eos_token_id=eos, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


CONFIGS = {"qwen3_moe": qwen3_moe_config, "qwen3_5_moe": qwen3_5_config, "deepseek_v2": deepseek_v2_config}


if __name__ == "__main__":
    main()
