"""A DeepSeek-V2-Lite-shaped bench model (multi-head latent attention, 64 routed experts top-6, 2 shared experts,
a dense first layer, greedy softmax routing), scaled down like bench/make_model.py's, bf16, random weights (seed 0);
with --gguf also the same model as a bf16 GGUF from llama.cpp's converter (arch deepseek2) for bench/bench.py.
It is `bench/make_model.py --family deepseek_v2`, which takes the same options.

    python bench/make_deepseek.py OUT [--gguf OUT.gguf --converter DIR] [--layers 12 --hidden 1024 ...]

Shape: DeepSeek-V2-Lite's (27 layers, hidden 2048, 16 heads, kv_lora_rank 512, qk 128 + 64, v 128, 64 experts of
1408, top-6, 2 shared, vocabulary 102400) with 12 layers, hidden 1024, expert FFN 384 (make_model.py's scale) and a
low-rank q (q_lora_rank 384: the llama.cpp in llama-cpp-python 0.3.36 loads a full-rank q only at V2-Lite's 26/27
layers). About 2.3 GB.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_model  # noqa: E402  (bench/ is not a package)

if __name__ == "__main__":
    sys.argv[1:] = [*sys.argv[1:], "--family", "deepseek_v2"]
    make_model.main()
