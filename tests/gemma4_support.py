"""Tiny Gemma 4 MoE checkpoints made with transformers in the published layout (Gemma4ForConditionalGeneration:
the text model under model.language_model.*, a tiny vision tower under model.vision_tower.*, stacked experts),
with every norm, scale and scalar moved off its init so a wrong convention shows."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from family_support import chat_tokenizer, save

# 6 layers, 5:1 sliding/full, a window shorter than the prompts, the full layers wider with fewer kv heads and
# k = v (the 26B-A4B's attention_k_eq_v), proportional RoPE on a quarter of their pairs
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
            enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32, sliding_window=8,
            hidden_size_per_layer_input=0, final_logit_softcapping=30.0, max_position_embeddings=512,
            rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)


ROUTER_STD = 1.0  # router weights: logits of about unit size, so a top-k choice is decisive (not a near-tie)


def perturb(model, seed: int = 0, router_std: float = ROUTER_STD, qk_norm: float = 1.0):
    """Norm weights, router scales, per-expert scales and layer scalars away from 1 (Gemma 4 initialises them to 1:
    a wrong 1 + w or a missing scale would go unseen)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():  # larger than the 0.02 init: decisive logits in a tiny model
            if t.dim() >= 2 and "language_model" in name:
                t.normal_(0.0, router_std if name.endswith("router.proj.weight") else 0.08, generator=g)
        for name, t in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "layernorm_1.weight", "layernorm_2.weight",
                              "router.scale", "per_expert_scale")) and "language_model" in name:
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    t.mul_(qk_norm)  # attention scale 1: these set how sharp the softmax is
        for name, t in model.named_buffers():
            if name.endswith("layer_scalar"):
                t.copy_(0.6 + 0.8 * torch.rand(t.shape, generator=g))


def save_gemma4(path, tokenizer_dir=None, dtype=torch.float32, seed: int = 0, vocab_size: int = 512,
                router_std: float = ROUTER_STD, qk_norm: float = 1.0, **text):
    """A random Gemma4ForConditionalGeneration saved at path (config, safetensors, the tokenizer files of
    tokenizer_dir when given); returns path."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    cfg = Gemma4Config(text_config={**TEXT, "vocab_size": vocab_size, **text}, vision_config=VISION, audio_config=None)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(cfg).eval()
    perturb(model, seed, router_std, qk_norm)
    return save(model, Path(path), tokenizer_dir, dtype, shard_size=None)


def load_reference(path, dtype=torch.float32):
    """transformers' model of the checkpoint, its experts run by the eager loop (the grouped_mm default sums a
    token's experts in another order: last-bit bf16 differences that are not the model's)."""
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()


CHAT_TEMPLATE = Path(__file__).parent / "data" / "gemma4" / "chat_template.jinja"  # llama.cpp's copy of Gemma 4's
SPECIALS = ["<bos>", "<eos>", "<pad>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>",
            "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<|image|>"]


def gemma_tokenizer(tokenizer_dir, out_dir) -> int:
    """The test tokenizer with Gemma 4's turn and channel tokens added and its chat template (the published one, as
    llama.cpp keeps it in models/templates), written to out_dir; returns the vocabulary size."""
    return chat_tokenizer(tokenizer_dir, out_dir, SPECIALS, bos_token="<bos>", eos_token="<turn|>", pad_token="<pad>",
                          chat_template=CHAT_TEMPLATE.read_text())


def spm_tokenizer(out_dir, vocab_size: int = 700) -> int:
    """A small Llama-style (SentencePiece) BPE tokenizer.json with byte fallback, Gemma 4's specials first and its
    chat template, trained on the local corpus: the kind llama.cpp's Gemma 4 converter takes (gguf.LlamaHfVocab
    refuses byte-level BPE). Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from conftest import local_corpus

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    text = "\n".join(local_corpus(200_000))  # cut into 1000-character pieces below: with no pre-tokenizer a
    # whole file would be one "word" to the trainer, whose pair counting is slow on long words
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator([text[i : i + 1000] for i in range(0, len(text), 1000)], trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<turn|>",
        "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE.read_text()}))
    return tok.get_vocab_size()


def router_margins(model, ids: list[int]) -> torch.Tensor:
    """[T] per position, the smallest gap over layers between the k-th and (k+1)-th router log-probabilities
    (transformers, its dtype): where it is tiny a last-bit difference may pick another expert."""
    from gguf_support import router_margins as margins

    return margins(model, ids, model.config.text_config.top_k_experts, probabilities=True)
