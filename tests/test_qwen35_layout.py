"""What the published Qwen3.5-MoE and Qwen3-Next layouts hold, as transformers writes them (docs/qwen3_5-notes.md):
the names, shapes and config keys a loader will need, and the conventions (norms, output gate, partial mRoPE) its
math must follow.

Shape legend: H hidden, N query heads, G kv heads, D head dim, E experts, I expert width, S shared expert width.
"""
from __future__ import annotations

import json

import pytest
import torch

from moepage.engine.attention.gated_delta import CHECKPOINT_SUFFIX, GatedDeltaShape, resident_weight_names
from qwen35_support import (PUBLISHED_TEXT_EXTRAS, QWEN3_NEXT, QWEN35_TEXT, save_qwen3_next, save_qwen35,
                                  save_qwen35_text, stored_shapes, with_published_extras)


def layer_names(prefix: str, cfg: dict, layer: int, mixer: str, layout: str, sparse: bool = True):
    """{name: shape} of one decoder layer under prefix (model.language_model. or model.)."""
    H, D, N, G = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E, I, S = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
    p = f"{prefix}layers.{layer}."
    names = {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
    if mixer == "linear_attention":
        shapes = GatedDeltaShape.from_config(cfg).weight_shapes(layout)
        names |= {p + CHECKPOINT_SUFFIX[n]: shapes[n] for n in resident_weight_names(layout)}
    else:
        names |= {p + "self_attn.q_proj.weight": (2 * N * D, H), p + "self_attn.k_proj.weight": (G * D, H),
                  p + "self_attn.v_proj.weight": (G * D, H), p + "self_attn.o_proj.weight": (H, N * D),
                  p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
    if not sparse:
        F = cfg["intermediate_size"]
        return names | {p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                        p + "mlp.down_proj.weight": (H, F)}
    names |= {p + "mlp.gate.weight": (E, H), p + "mlp.shared_expert_gate.weight": (1, H),
              p + "mlp.shared_expert.gate_proj.weight": (S, H), p + "mlp.shared_expert.up_proj.weight": (S, H),
              p + "mlp.shared_expert.down_proj.weight": (H, S)}
    for e in range(E):
        names |= {f"{p}mlp.experts.{e}.gate_proj.weight": (I, H), f"{p}mlp.experts.{e}.up_proj.weight": (I, H),
                  f"{p}mlp.experts.{e}.down_proj.weight": (H, I)}
    return names


EXPECTED_LAYER_TYPES = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]


@pytest.fixture(scope="module")
def qwen35_dir(tmp_path_factory):
    d = save_qwen35(tmp_path_factory.mktemp("qwen35"))
    with_published_extras(d)
    return d


def test_qwen35_published_layout(qwen35_dir):
    config = json.loads((qwen35_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and config["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    assert config["tie_word_embeddings"] is False and "vision_config" in config
    text = config["text_config"]
    assert text["model_type"] == "qwen3_5_moe_text"
    assert text["layer_types"] == EXPECTED_LAYER_TYPES  # every 4th layer full attention
    assert text["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert text["rope_parameters"]["mrope_section"] == [1, 1, 0] and text["rope_parameters"]["mrope_interleaved"]
    assert "norm_topk_prob" not in text and "decoder_sparse_step" not in text  # always renormalised, every layer MoE
    assert {k: text[k] for k in PUBLISHED_TEXT_EXTRAS} == PUBLISHED_TEXT_EXTRAS

    shapes = stored_shapes(qwen35_dir)
    index = json.loads((qwen35_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(shapes) and len(set(index.values())) > 2  # sharded, every tensor indexed
    lm = "model.language_model."
    want = {"lm_head.weight": (400, 64), lm + "embed_tokens.weight": (400, 64), lm + "norm.weight": (64,)}
    for i, kind in enumerate(EXPECTED_LAYER_TYPES):
        want |= layer_names(lm, QWEN35_TEXT, i, kind, "qwen3_5_moe")
    text_part = {n: s for n, s in shapes.items() if not n.startswith(("model.visual.", "mtp."))}
    assert text_part == want
    skipped = [n for n in shapes if n not in want]
    assert skipped and all(n.startswith(("model.visual.", "mtp.")) for n in skipped)
    assert any(n.startswith("mtp.layers.0.mlp.experts.") for n in skipped)
    assert "model.visual.patch_embed.proj.weight" in skipped and "model.visual.merger.linear_fc2.weight" in skipped


def test_qwen35_with_published_extras_still_loads_in_transformers(qwen35_dir):
    """mtp.* and the extra config keys are what a download holds; transformers ignores both, so must we."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(qwen35_dir).eval()
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 16, 400) and torch.isfinite(logits).all()
    assert model.config.text_config.layer_types == EXPECTED_LAYER_TYPES


def test_qwen35_text_only_layout(tmp_path):
    d = save_qwen35_text(tmp_path / "text")
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe_text" and "text_config" not in config
    assert config["architectures"] == ["Qwen3_5MoeForCausalLM"]
    want = {"lm_head.weight": (400, 64), "model.embed_tokens.weight": (400, 64), "model.norm.weight": (64,)}
    for i, kind in enumerate(EXPECTED_LAYER_TYPES):
        want |= layer_names("model.", QWEN35_TEXT, i, kind, "qwen3_5_moe")
    assert stored_shapes(d) == want


def test_qwen3_next_layout(tmp_path):
    d = save_qwen3_next(tmp_path / "next")
    with_published_extras(d, text_key=None)
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "qwen3_next" and config["architectures"] == ["Qwen3NextForCausalLM"]
    assert config["layer_types"] == EXPECTED_LAYER_TYPES
    assert config["mlp_only_layers"] == [1] and config["decoder_sparse_step"] == 1 and config["norm_topk_prob"]
    shapes = stored_shapes(d)
    want = {"lm_head.weight": (400, 64), "model.embed_tokens.weight": (400, 64), "model.norm.weight": (64,)}
    for i, kind in enumerate(EXPECTED_LAYER_TYPES):
        want |= layer_names("model.", QWEN3_NEXT, i, kind, "qwen3_next", sparse=i != 1)
    assert {n: s for n, s in shapes.items() if not n.startswith("mtp.")} == want
    from transformers import Qwen3NextForCausalLM

    model = Qwen3NextForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(1, 9)[None]).logits).all()


def test_norm_conventions_output_gate_and_partial_rope():
    """Main norms x * (1 + w) rounded once, in float32; the DeltaNet norm w * x * silu(z); q_proj rows hold
    [q | gate] per head; with text positions mRoPE is plain RoPE over the first D * 0.25 dims."""
    from transformers import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m

    from moepage.kernels.gated_delta import gated_rms_norm
    from moepage.kernels.rope import RotaryTable

    g = torch.Generator().manual_seed(0)
    x, w, z = torch.randn(3, 8, generator=g).bfloat16(), torch.randn(8, generator=g).bfloat16(), torch.randn(3, 8)
    norm = m.Qwen3_5MoeRMSNorm(8)
    norm.weight.data = w.clone()
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x), (h * (1 + w.float())).bfloat16())
    gated = m.Qwen3_5MoeRMSNormGated(8)
    gated.weight.data = w.clone()
    assert torch.equal(gated(x, z.bfloat16()), gated_rms_norm(x, z.bfloat16(), w, 1e-6))

    cfg = Qwen3_5MoeTextConfig(**QWEN35_TEXT)
    attn = m.Qwen3_5MoeAttention(cfg, layer_idx=3)
    N, D = cfg.num_attention_heads, cfg.head_dim
    seen = {}
    attn.q_norm.register_forward_hook(lambda mod, i, out: seen.setdefault("q", i[0]))
    hs = torch.randn(1, 5, 64, generator=g)
    rope = m.Qwen3_5MoeTextRotaryEmbedding(cfg)
    pos = torch.arange(5)[None]
    cos, sin = rope(hs, pos[None].expand(3, -1, -1))
    with torch.no_grad():
        attn(hs, (cos, sin), attention_mask=None)
        q = attn.q_proj(hs).view(1, 5, N, 2 * D)
    assert torch.equal(seen["q"], q[..., :D])  # per head: D query rows, then D output-gate rows

    rot = int(D * 0.25)
    table = RotaryTable(rot, 10000000.0, None, torch.float32, "cpu")
    want_cos, want_sin = table.get(0, 5)
    assert cos.shape[-1] == rot and torch.allclose(cos[0], want_cos) and torch.allclose(sin[0], want_sin)
