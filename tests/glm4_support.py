"""Tiny random GLM-4.5-style (glm4_moe) checkpoints written by transformers' save_pretrained, as the published
repositories store them: bf16 weights, the router's e_score_correction_bias in float32 (moved off its zero init), a
dense first layer, one shared expert, more than one expert group."""
from __future__ import annotations

import json

import torch

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


def randomize_glm(model: torch.nn.Module, seed: int) -> None:
    """Matrices N(0, 0.08); Llama-style norms 1 + 0.2 N (off their ones init), biases 0.2 N; each router's
    correction bias 0.15 N in float32 (as published), large enough to change which experts are chosen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.08 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.15 * torch.randn(b.shape, generator=g))


def save_glm4_moe(out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, zero_head: bool = False, **over):
    """zero_head: an all-zero lm_head (logits exactly 0), for server tests that force the output with logit_bias."""
    from transformers import Glm4MoeForCausalLM

    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(glm4_moe_config(**over))
    randomize_glm(model, seed)
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.to(dtype)
    for layer in model.model.layers:  # the published checkpoints keep the correction bias in float32
        gate = getattr(layer.mlp, "gate", None)
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias = gate.e_score_correction_bias.float()
    model.save_pretrained(out_dir, max_shard_size="200KB")
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out_dir


def stored_dtypes(model_dir) -> dict[str, str]:
    """{tensor name: safetensors dtype} over every shard (headers only)."""
    import os

    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


def config_of(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


GLM_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>"]  # GLM-4.5's added special tokens (151329...), in their order
GLM_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<arg_key>",
            "</arg_key>", "<arg_value>", "</arg_value>"]  # added as one token each, decoded as text
CHAT_TEMPLATE = __import__("pathlib").Path(__file__).parent / "data" / "glm4_moe" / "chat_template.jinja"


def glm_tokenizer(tokenizer_dir, out_dir) -> int:
    """The test tokenizer with GLM-4.5's special tokens added and GLM-4.6's chat template (llama.cpp's copy,
    models/templates/GLM-4.6.jinja), written to out_dir; returns the vocabulary size. llama.cpp's converter reads
    [gMASK], <|user|>, <|endoftext|> and <|observation|> by name."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM_SPECIALS
                            if tok.token_to_id(t) is None])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in GLM_TAGS if tok.token_to_id(t) is None])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config.update(eos_token="<|user|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE.read_text())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)


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
    near = torch.zeros(len(ids), dtype=torch.bool)
    for r, b in zip(logits, biases):
        choice = r.reshape(len(ids), -1).sigmoid() + b  # [T, E]
        T, E = choice.shape
        groups = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)  # [T, G]
        if g < G:
            top = groups.topk(g + 1, dim=-1).values
            near |= (top[:, g - 1] - top[:, g]) < SIGMOID_TIE
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(g, dim=-1).indices, True)
        allowed = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
        top = allowed.topk(K + 1, dim=-1).values
        near |= (top[:, K - 1] - top[:, K]) < SIGMOID_TIE
    tied = near.nonzero()
    return int(tied[0]) if len(tied) else len(ids)
