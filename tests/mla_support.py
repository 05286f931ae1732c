"""Tiny random multi-head latent attention checkpoints written by transformers' save_pretrained: DeepSeek-V2
(group-limited greedy softmax router, complex RoPE), DeepSeek-V3 and GLM-4.7-Flash (sigmoid router with a non-zero
e_score_correction_bias and more than one expert group, interleaved RoPE, YaRN with mscale), the Kimi K2.5 wrapper
(a DeepSeek-V3 text model beside a tiny vision tower). Each has a dense first layer, shared experts and a low-rank q
(V2: a full-rank q_proj, as V2-Lite)."""
from __future__ import annotations

import torch

from family_support import random_model, save

MLA = dict(vocab_size=400, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
           kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
           intermediate_size=96, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=8,
           num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=512, rms_norm_eps=1e-6,
           tie_word_embeddings=False)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 0.7}
FAMILY_CONFIGS = {
    "deepseek_v3": dict(MLA, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                        rope_parameters=YARN, rope_interleave=True),
    "glm4_moe_lite": dict(MLA, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_interleave=True,
                          mlp_layer_types=["dense", "sparse", "sparse"], n_shared_experts=2),
    "deepseek_v2": dict(MLA, q_lora_rank=None, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                        norm_topk_prob=False, routed_scaling_factor=1.5, n_shared_experts=2,
                        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707)),
}
CLASSES = {"deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
           "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM"),
           "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM")}


# Decisive random weights (family_support.randomize): router weights larger so routing is decided, every
# e_score_correction_bias non-zero (a buffer: transformers inits it to zeros)
WEIGHTS = dict(router_std=0.3, correction_bias_std=0.05)


def mla_config(family: str, eos: int | None = None, **over):
    import transformers

    return getattr(transformers, CLASSES[family][0])(**{**FAMILY_CONFIGS[family], "eos_token_id": eos, **over})


def save_mla(family: str, out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, **over):
    import transformers

    model = random_model(getattr(transformers, CLASSES[family][1]), mla_config(family, **over), seed, **WEIGHTS)
    return save(model, out_dir, tokenizer_dir, dtype)


def publish_kimi_names(out_dir) -> None:
    """transformers 5.24 reverses its kimi_k25 load-time rename `blocks` -> `layers` (meant for the vision tower) on
    the text decoder too when saving (language_model.model.blocks.N); the published checkpoints name it
    language_model.model.layers.N, which transformers loads as well. Rewrite the shards so."""
    import json

    from safetensors.torch import load_file, save_file

    fix = lambda n: n.replace("language_model.model.blocks.", "language_model.model.layers.")  # noqa: E731
    for f in out_dir.glob("*.safetensors"):
        tensors = load_file(str(f))
        save_file({fix(n): t.contiguous() for n, t in tensors.items()}, str(f), metadata={"format": "pt"})
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {fix(n): v for n, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))


KIMI_VISION = dict(patch_size=4, pos_emb_height=4, pos_emb_width=4, pos_emb_time=2, num_attention_heads=2,
                   num_hidden_layers=1, hidden_size=16, intermediate_size=32, merge_kernel_size=[2, 2])


def save_kimi_k25(out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, **over):
    """Kimi K2.5's wrapper: a DeepSeek-V3 text model (text_config) beside a tiny vision tower and projector."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    text = {**FAMILY_CONFIGS["deepseek_v3"], "model_type": "deepseek_v3", "eos_token_id": None, **over}
    config = Kimi_K25Config(text_config=text, vision_config=KIMI_VISION, projection_hidden_size=32,
                            tie_word_embeddings=False)
    save(random_model(Kimi_K25ForConditionalGeneration, config, seed, **WEIGHTS), out_dir, tokenizer_dir, dtype)
    publish_kimi_names(out_dir)
    return out_dir
