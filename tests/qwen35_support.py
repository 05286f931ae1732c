"""Tiny random Qwen3.5-MoE (the published multimodal layout, a tiny vision tower included; and the text-only
layout) and Qwen3-Next checkpoints, written by transformers' save_pretrained.

The published repositories also carry the multi-token-prediction head (`mtp.*`, which transformers neither
loads nor writes) in a shard of its own and a few config keys transformers does not define; `with_published_extras`
adds both so a loader meets what a download holds: weights it must never read and keys it must ignore.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from family_support import chat_tokenizer, random_model, save, stored_headers
from gguf_support import convert_one


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch/OpenMP thread for the module (restored after): on a shared 2-core runner two threads that meet at a
    barrier each kernel call wait on each other's time slices (a test's wall time 5-10x); the answers checked do
    not depend on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


QWEN35_TEXT = dict(
    vocab_size=400, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
    num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [1, 1, 0], "mrope_interleaved": True},
)
QWEN35_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                     num_position_embeddings=16, spatial_merge_size=2, temporal_patch_size=2)
QWEN3_NEXT = dict(
    vocab_size=400, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
)
# Keys the published Qwen3.5 text_config carries beyond transformers' own (as recalled; the loader must not need them).
PUBLISHED_TEXT_EXTRAS = {"attn_output_gate": True, "full_attention_interval": 4, "mtp_num_hidden_layers": 1,
                         "mtp_use_dedicated_embeddings": False, "mamba_ssm_dtype": "float32"}
UNIT_NORMS = ("linear_attn.norm.weight",)  # the gated norm's plain w; the others are zero-centred, x * (1 + w)


def qwen35_config(eos: int | None = None, **text_over):
    from transformers import Qwen3_5MoeConfig

    return Qwen3_5MoeConfig(text_config={**QWEN35_TEXT, "eos_token_id": eos, **text_over}, vision_config=QWEN35_VISION,
                            tie_word_embeddings=False)


def qwen3_next_config(eos: int | None = None, **over):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**{**QWEN3_NEXT, "eos_token_id": eos, **over})


def save_qwen35(out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, zero_head: bool = False,
                **text_over):
    """The published layout: Qwen3_5MoeForConditionalGeneration (config under text_config, weights under
    model.language_model.*, model.visual.*, lm_head.weight at the top). zero_head: an all-zero lm_head (logits
    exactly 0), for server tests that force the output with logit_bias."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    model = random_model(Qwen3_5MoeForConditionalGeneration, qwen35_config(**text_over), seed, unit_norms=UNIT_NORMS)
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    return save(model, out_dir, tokenizer_dir, dtype)


CHAT_TEMPLATE = __import__("pathlib").Path(__file__).parent / "data" / "qwen3_5_moe" / "chat_template.jinja"
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
QWEN_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=",
             "</parameter>", "<tool_response>", "</tool_response>"]


def qwen35_tokenizer(tokenizer_dir, out_dir) -> int:
    """The test tokenizer with Qwen's chat tokens and tool-call tags added and Qwen3.5's chat template (llama.cpp's
    copy, models/templates/Qwen3.5-4B.jinja: thinking on by default, Qwen3-Coder XML tool calls), written to
    out_dir; returns the vocabulary size."""
    return chat_tokenizer(tokenizer_dir, out_dir, QWEN_SPECIALS, QWEN_TAGS, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE.read_text())


def save_qwen35_text(out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, **text_over):
    """The text-only layout: Qwen3_5MoeForCausalLM (model_type qwen3_5_moe_text, weights under model.*)."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    config = Qwen3_5MoeTextConfig(**{**QWEN35_TEXT, **text_over})
    return save(random_model(Qwen3_5MoeForCausalLM, config, seed, unit_norms=UNIT_NORMS), out_dir, tokenizer_dir, dtype,
                shard_size=None)


def save_qwen3_next(out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, **over):
    from transformers import Qwen3NextForCausalLM

    model = random_model(Qwen3NextForCausalLM, qwen3_next_config(**over), seed, unit_norms=UNIT_NORMS)
    return save(model, out_dir, tokenizer_dir, dtype)


def mtp_tensors(text: dict, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """One MTP layer as the published checkpoints name it (a full-attention MoE decoder layer behind fc)."""
    H, D, N, G = text["hidden_size"], text["head_dim"], text["num_attention_heads"], text["num_key_value_heads"]
    E, I, S = text["num_experts"], text["moe_intermediate_size"], text["shared_expert_intermediate_size"]
    p = "mtp.layers.0."
    shapes = {"mtp.fc.weight": (H, 2 * H), "mtp.pre_fc_norm_embedding.weight": (H,),
              "mtp.pre_fc_norm_hidden.weight": (H,), "mtp.norm.weight": (H,),
              p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
              p + "self_attn.q_proj.weight": (2 * N * D, H), p + "self_attn.k_proj.weight": (G * D, H),
              p + "self_attn.v_proj.weight": (G * D, H), p + "self_attn.o_proj.weight": (H, N * D),
              p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
              p + "mlp.gate.weight": (E, H), p + "mlp.shared_expert_gate.weight": (1, H),
              p + "mlp.shared_expert.gate_proj.weight": (S, H), p + "mlp.shared_expert.up_proj.weight": (S, H),
              p + "mlp.shared_expert.down_proj.weight": (H, S)}
    for e in range(E):
        shapes |= {f"{p}mlp.experts.{e}.gate_proj.weight": (I, H), f"{p}mlp.experts.{e}.up_proj.weight": (I, H),
                   f"{p}mlp.experts.{e}.down_proj.weight": (H, I)}
    g = torch.Generator().manual_seed(7)
    return {n: (torch.randn(s, generator=g) * 0.08).to(dtype) for n, s in shapes.items()}


def with_published_extras(model_dir, text_key: str | None = "text_config") -> None:
    """Add an mtp.* shard (listed in the safetensors index) and the published config extras to a sharded
    checkpoint written by save_qwen35 / save_qwen3_next."""
    from safetensors.torch import save_file

    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    text = config[text_key] if text_key else config
    text.update(PUBLISHED_TEXT_EXTRAS)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    tensors = mtp_tensors(text, getattr(torch, config.get("dtype") or text.get("dtype") or "float32"))
    shard = "model-mtp.safetensors"
    save_file(tensors, os.path.join(model_dir, shard), metadata={"format": "pt"})
    index["weight_map"].update({n: shard for n in tensors})
    index.setdefault("metadata", {})["total_size"] = index["metadata"].get("total_size", 0) + sum(
        t.numel() * t.element_size() for t in tensors.values())
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)


def stored_shapes(model_dir) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} over every safetensors shard of a directory (headers only)."""
    return {name: shape for name, (_, shape) in stored_headers(model_dir).items()}


def convert_to_gguf(converter_dir: str, hf_dir, out_path, outtype: str = "f16") -> str:
    """llama.cpp's convert_hf_to_gguf.py (tests/gguf_support.py's wrapper) with --no-mtp: its Qwen3.5/Qwen3-Next
    classes expect an MTP head otherwise, which these tiny checkpoints do not have."""
    return convert_one(converter_dir, hf_dir, out_path, outtype, extra=("--no-mtp",))
