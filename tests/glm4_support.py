"""Tiny random GLM-4.5-style (glm4_moe) checkpoints written by transformers' save_pretrained, as the published
repositories store them: bf16 weights, the router's e_score_correction_bias in float32 (moved off its zero init), a
dense first layer, one shared expert, more than one expert group."""
from __future__ import annotations

import torch

from family_support import chat_tokenizer, random_model, save, stored_headers
from gguf_support import first_tie

GLM4_MOE = dict(
    vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts_per_tok=3, n_shared_experts=1,
    n_routed_experts=8, n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, use_qk_norm=True,
    attention_bias=True, routed_scaling_factor=2.5, max_position_embeddings=512, rms_norm_eps=1e-5,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5},
)


def glm4_moe_config(eos: int | None = None, **over):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**{**GLM4_MOE, "eos_token_id": eos, **over})


def save_glm4_moe(out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, zero_head: bool = False, **over):
    """Matrices N(0, 0.08); Llama-style norms 1 + 0.2 N (off their ones init), biases 0.2 N; each router's
    correction bias 0.15 N, kept float32 (as published), large enough to change which experts are chosen.
    zero_head: an all-zero lm_head (logits exactly 0), for server tests that force the output with logit_bias."""
    from transformers import Glm4MoeForCausalLM

    model = random_model(Glm4MoeForCausalLM, glm4_moe_config(**over), seed, correction_bias_std=0.15)
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    return save(model, out_dir, tokenizer_dir, dtype, float32_buffers=("e_score_correction_bias",))


def stored_dtypes(model_dir) -> dict[str, str]:
    """{tensor name: safetensors dtype} over every shard (headers only)."""
    return {name: dtype for name, (dtype, _) in stored_headers(model_dir).items()}


GLM_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>"]  # GLM-4.5's added special tokens (151329...), in their order
GLM_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<arg_key>",
            "</arg_key>", "<arg_value>", "</arg_value>"]  # added as one token each, decoded as text
CHAT_TEMPLATE = __import__("pathlib").Path(__file__).parent / "data" / "glm4_moe" / "chat_template.jinja"


def glm_tokenizer(tokenizer_dir, out_dir) -> int:
    """The test tokenizer with GLM-4.5's special tokens added and GLM-4.6's chat template (llama.cpp's copy,
    models/templates/GLM-4.6.jinja), written to out_dir; returns the vocabulary size. llama.cpp's converter reads
    [gMASK], <|user|>, <|endoftext|> and <|observation|> by name."""
    return chat_tokenizer(tokenizer_dir, out_dir, GLM_SPECIALS, GLM_TAGS, eos_token="<|user|>",
                          pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE.read_text())


SIGMOID_TIE = 1e-3  # choice-score margin (sigmoid + bias) under which f16 rounding may pick another expert


def first_sigmoid_router_tie(hf_dir, ids: list[int], config: dict) -> int:
    """The first position where a sigmoid group-limited router (transformers, float32) is near a tie: its
    topk_group-th and next group scores, or its k-th and (k+1)-th allowed choice scores, within SIGMOID_TIE;
    len(ids) when none is."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), output_router_logits=True).router_logits
    G, g, K = config.get("n_group", 1), config.get("topk_group", 1), config["num_experts_per_tok"]
    margins = torch.full((len(ids),), float("inf"))
    for r, b in zip(logits, biases):
        choice = r.reshape(len(ids), -1).sigmoid() + b  # [T, E]
        T, E = choice.shape
        groups = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)  # [T, G]
        if g < G:
            top = groups.topk(g + 1, dim=-1).values
            margins = margins.minimum(top[:, g - 1] - top[:, g])
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(g, dim=-1).indices, True)
        allowed = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
        top = allowed.topk(K + 1, dim=-1).values
        margins = margins.minimum(top[:, K - 1] - top[:, K])
    return first_tie(margins, SIGMOID_TIE)
