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


def qwen35_config(eos: int | None = None, **text_over):
    from transformers import Qwen3_5MoeConfig

    return Qwen3_5MoeConfig(text_config={**QWEN35_TEXT, "eos_token_id": eos, **text_over}, vision_config=QWEN35_VISION,
                            tie_word_embeddings=False)


def qwen3_next_config(eos: int | None = None, **over):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**{**QWEN3_NEXT, "eos_token_id": eos, **over})


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Decisive random weights: matrices N(0, 0.08); zero-centred norms (x * (1 + w)) and the gated norm's plain w
    moved off their init so a wrong convention shows; decays in a trained model's range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.copy_((torch.rand(p.shape, generator=g) * 2.5 + 0.5).log())
            elif name.endswith("linear_attn.norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.08 * noise)


def save(model, out_dir, tokenizer_dir=None, dtype=torch.float32, shard_size: str | None = None):
    model.to(dtype).save_pretrained(out_dir, **({"max_shard_size": shard_size} if shard_size else {}))
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out_dir


def save_qwen35(out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, zero_head: bool = False,
                **text_over):
    """The published layout: Qwen3_5MoeForConditionalGeneration (config under text_config, weights under
    model.language_model.*, model.visual.*, lm_head.weight at the top). zero_head: an all-zero lm_head (logits
    exactly 0), for server tests that force the output with logit_bias."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3_5MoeForConditionalGeneration(qwen35_config(**text_over))
    randomize(model, seed)
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    return save(model, out_dir, tokenizer_dir, dtype, shard_size="200KB")


CHAT_TEMPLATE = __import__("pathlib").Path(__file__).parent / "data" / "qwen3_5_moe" / "chat_template.jinja"
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
QWEN_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=",
             "</parameter>", "<tool_response>", "</tool_response>"]


def qwen35_tokenizer(tokenizer_dir, out_dir) -> int:
    """The test tokenizer with Qwen's chat tokens and tool-call tags added and Qwen3.5's chat template (llama.cpp's
    copy, models/templates/Qwen3.5-4B.jinja: thinking on by default, Qwen3-Coder XML tool calls), written to
    out_dir; returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS
                            if tok.token_to_id(t) is None])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_TAGS if tok.token_to_id(t) is None])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config.update(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE.read_text())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)


def save_qwen35_text(out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, **text_over):
    """The text-only layout: Qwen3_5MoeForCausalLM (model_type qwen3_5_moe_text, weights under model.*)."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**{**QWEN35_TEXT, **text_over}))
    randomize(model, seed)
    return save(model, out_dir, tokenizer_dir, dtype)


def save_qwen3_next(out_dir, tokenizer_dir=None, seed: int = 0, dtype=torch.float32, **over):
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(qwen3_next_config(**over))
    randomize(model, seed)
    return save(model, out_dir, tokenizer_dir, dtype, shard_size="200KB")


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
    from safetensors import safe_open

    shapes = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def convert_to_gguf(converter_dir: str, hf_dir, out_path, outtype: str = "f16") -> str:
    """llama.cpp's convert_hf_to_gguf.py (tests/gguf_support.py's wrapper) with --no-mtp: its Qwen3.5/Qwen3-Next
    classes expect an MTP head otherwise, which these tiny checkpoints do not have."""
    import subprocess
    import sys

    from gguf_support import CONVERT_WRAPPER

    wrapper = CONVERT_WRAPPER.replace('"--outtype", outtype]', '"--outtype", outtype, "--no-mtp"]')
    assert wrapper != CONVERT_WRAPPER
    r = subprocess.run([sys.executable, "-c", wrapper, converter_dir, json.dumps([[str(hf_dir), str(out_path), outtype]])],
                       capture_output=True, text=True, env=dict(os.environ, NO_LOCAL_GGUF="1"), timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return str(out_path)


def check_gguf_against_llama_cpp(hf_dir, gguf_path, prompt: str = "import os\nimport sys\n\ndef main():\n",
                                 min_tokens: int = 8) -> int:
    """A llama.cpp-converted hybrid GGUF served by moepage (fp32, experts paged from the file): 32 greedy tokens equal
    to llama.cpp's with every logit within 0.05 of its own, or, where they are not, equal up to the first router
    near-tie (tests/test_gguf_families.py; there an f16 rounding may pick another expert and the two continuations
    part for a reason that is not a bug) and within 0.05 before it; then the same tokens at 25% of the experts and
    the minimum. Returns the number of tokens compared."""
    from gguf_support import LlamaCppGreedy
    from test_gguf_families import first_router_tie
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.sampling import SamplingParams

    engine = Engine.load(EngineConfig(str(gguf_path), dtype="float32"))
    ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ours = [s.token for s in engine.generate(ids, params)]
    llm = LlamaCppGreedy(str(gguf_path))
    try:
        theirs, rows = llm.generate(ids, 32)
    finally:
        llm.close()
    logits = engine.logits_all(ids + theirs)[len(ids) - 1 : len(ids) - 1 + 32]
    gaps = (logits - torch.stack([torch.from_numpy(r) for r in rows])).abs().amax(dim=-1)  # [32]
    n = 32
    if ours != theirs or gaps.max() >= 0.05:  # a difference only after a router near-tie, and small before it
        n = min(32, first_router_tie(str(hf_dir), ids + theirs, engine.args.top_k) - len(ids) + 1)
        assert n >= min_tokens, f"a router near-tie after {n} tokens and a difference: {ours} vs {theirs}"
        gap = gaps[:n].max().item()
        assert gap < 0.05, f"logits differ from llama.cpp's by {gap} within {n} tokens"
        i = next((k for k, (x, y) in enumerate(zip(ours[:n], theirs[:n])) if x != y), None)
        if i is not None:  # only where llama.cpp's own top two are within the logit gap
            assert float(rows[i][theirs[i]] - rows[i][ours[i]]) < 3 * gap, (i, ours, theirs)
    a, each = engine.args, engine.plan.expert_bytes_each
    engine.close()
    for budget in (each * len(a.moe_layers) * a.num_experts // 4, a.top_k * each):  # 25% and the minimum
        paged = Engine.load(EngineConfig(str(gguf_path), dtype="float32", expert_cache_bytes=budget, preload=False))
        assert [s.token for s in paged.generate(ids, params)] == ours
        assert paged.cache.stats.snapshot()["evictions"] > 0
        paged.close()
    return n


def greedy(engine, ids, n: int = 32) -> list[int]:
    from moepage.engine.sampling import SamplingParams

    return [s.token for s in engine.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))]


def check_budgets_from_split_dirs(src, ids, want: list[int], out_root) -> None:
    """`split` and `split --lossless` directories of src give the greedy tokens want (src's, resident) at expert
    budgets of 100%, 25% and the minimum (top-k experts), each paging (misses; evictions below 100%)."""
    from moepage.engine.checkpoint import open_checkpoint
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.moe import PreparedExpert
    from moepage.surgery.split import split_checkpoint

    a = open_checkpoint(str(src)).args
    each = PreparedExpert.nbytes_for(a.hidden_size, a.moe_intermediate_size, torch.bfloat16)
    total = each * len(a.moe_layers) * a.num_experts
    for lossless in (False, True):
        out = out_root / f"split-{lossless}"
        split_checkpoint(str(src), str(out), lossless=lossless)
        for label, budget in (("100%", total), ("25%", total // 4), ("minimum", a.top_k * each)):
            engine = Engine.load(EngineConfig(str(out), expert_cache_bytes=budget, preload=False, tokenizer=False))
            assert greedy(engine, ids) == want, f"lossless={lossless} {label}"
            stats = engine.cache.stats.snapshot()
            assert stats["misses"] > 0 and (label == "100%" or stats["evictions"] > 0), (label, stats)
            engine.close()
