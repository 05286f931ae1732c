"""What the family tests (Qwen3.5 / Qwen3-Next, GLM-4.5, the MLA families, Gemma 4, gpt-oss) build and check alike,
written once: random weights and saving with the test tokenizer, a tokenizer with a family's chat tokens, stored
tensor headers, transformers as the reference (fp32 logits, bf16 generate), greedy tokens at expert budgets of 100%,
25% and the minimum (from the checkpoint, split directories or a GGUF), one HTTP request, a config edited next to the
original weights (hostile-config tests).

Shape legend: T tokens, V vocabulary.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from conftest import prompt_ids, reference_model
from moepage.surgery.checkpoint_writer import copy_tokenizer


def randomize(model: torch.nn.Module, seed: int, unit_norms: tuple[str, ...] = ("norm.weight",),
              router_std: float = 0.08, correction_bias_std: float | None = None) -> None:
    """Decisive random weights, one draw of N(0, 1) per parameter in order: matrices 0.08 N (a router,
    `mlp.gate.weight`, router_std N), norms named by unit_norms 1 + 0.2 N (Llama-style x * w off its ones init),
    other vectors (zero-centred norms x * (1 + w), biases) 0.2 N, DeltaNet decays `A_log` in a trained model's range;
    then each e_score_correction_bias buffer (transformers inits it to zeros) correction_bias_std N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.copy_((torch.rand(p.shape, generator=g) * 2.5 + 0.5).log())
            elif name.endswith(unit_norms):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(router_std * noise)
            else:
                p.copy_(0.08 * noise)
        if correction_bias_std is not None:
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_(correction_bias_std * torch.randn(b.shape, generator=g))


def random_model(model_class, config, seed: int, **weights) -> torch.nn.Module:
    """model_class(config) built under torch.manual_seed(seed), then randomize(model, seed, **weights)."""
    torch.manual_seed(seed)
    model = model_class(config)
    randomize(model, seed, **weights)
    return model


def save(model, out_dir, tokenizer_dir=None, dtype=torch.float32, shard_size: str | None = "200KB",
         float32_buffers: tuple[str, ...] = ()):
    """model in dtype (buffers named by float32_buffers kept float32, as published checkpoints keep a router's
    correction bias) saved to out_dir in shards of shard_size (None: one file) with the tokenizer files of
    tokenizer_dir (when given); returns out_dir."""
    model.to(dtype)
    for name, b in list(model.named_buffers()):
        if name.endswith(float32_buffers):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, b.float())
    model.save_pretrained(out_dir, **({"max_shard_size": shard_size} if shard_size else {}))
    if tokenizer_dir is not None:
        copy_tokenizer(str(tokenizer_dir), str(out_dir))
    return out_dir


def config_of(model_dir) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def chat_tokenizer(tokenizer_dir, out_dir, specials: list[str], tags: list[str] = (), **config) -> int:
    """The test tokenizer with a family's special tokens (and plain added tokens, tags: one token each, decoded as
    text) added where missing, its tokenizer_config.json updated with config (eos_token, chat_template, ...),
    written to out_dir; returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials
                            if tok.token_to_id(t) is None])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags if tok.token_to_id(t) is None])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    merged = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text()) | config
    (out_dir / "tokenizer_config.json").write_text(json.dumps(merged, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)


def stored_headers(model_dir) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} over every safetensors shard of a directory (headers only)."""
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                out |= {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    return out


def greedy(engine, ids, n: int = 32, **sampling) -> list[int]:
    from moepage.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **sampling)
    return [s.token for s in engine.generate(ids, params)]


def greedy_of(path, ids, n: int = 32, **engine) -> list[int]:
    """The n greedy tokens after ids of the checkpoint at path, loaded with engine (EngineConfig fields)."""
    from moepage.engine.engine import Engine, EngineConfig

    e = Engine.load(EngineConfig(str(path), **engine))
    try:
        return greedy(e, ids, n)
    finally:
        e.close()


def check_chunked_prefill_and_reuse(path, ids, n: int = 12, **engine) -> None:
    """A prefill in chunks of 5 gives the whole prefill's greedy tokens, and so does the same prompt again with the
    prompt cache on, re-using it up to the chunk end before its last token (a re-use leaves one token to prefill:
    the state at the prompt's own end would give no logits), which a sliding or recurrent layer keeps a copy of."""
    from moepage.engine.engine import Engine, EngineConfig

    want = greedy_of(path, ids, n, prefill_chunk=64, **engine)
    chunked = Engine.load(EngineConfig(str(path), prefill_chunk=5, prefix_cache=True, **engine))
    try:
        assert greedy(chunked, ids, n) == want
        assert chunked.last_stats.cached_prompt_tokens == 0
        assert greedy(chunked, ids, n) == want
        expected = chunked.chunks.exact_end(ids, len(ids) - 1)  # 25 of a 30-token prompt without end tokens
        assert expected > 0 and chunked.last_stats.cached_prompt_tokens == expected
    finally:
        chunked.close()


def logits_gap(engine, path, ids: list[int], reference=reference_model) -> float:
    """Largest |moepage - transformers| fp32 logit over the prompt (engine: the checkpoint at path, loaded)."""
    ours = engine.logits_all(ids)
    with torch.no_grad():
        ref = reference(path)(torch.tensor([ids])).logits[0]  # [T, V]
    return (ours.float() - ref.float()).abs().max().item()


def reference_greedy(path, ids: list[int], n: int = 32, dtype=torch.bfloat16, reference=reference_model) -> list[int]:
    """transformers.generate's n greedy tokens after ids (no eos), in dtype."""
    out = reference(path, dtype).generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def reference_greedy_margins(path, ids: list[int], n: int = 32, dtype=torch.bfloat16,
                             reference=reference_model) -> tuple[list[int], list[float]]:
    """reference_greedy's tokens and, at each, the gap between its top two logits."""
    out = reference(path, dtype).generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          eos_token_id=None, pad_token_id=0, output_logits=True,
                                          return_dict_in_generate=True)
    margins = [float(top[0] - top[1]) for top in (row[0].float().topk(2).values for row in out.logits)]
    return out.sequences[0, len(ids):].tolist(), margins


def check_greedy_until_a_near_tie(ours: list[int], theirs: list[int], margins: list[float], min_tokens: int = 16,
                                  tie: float = 2**-5) -> None:
    """Greedy tokens equal to the reference's, or equal up to a step where the reference's top two logits were
    within bf16 rounding of each other (sums in another order, e.g. torch on AMX CPUs, flip such a choice), after at
    least min_tokens equal tokens."""
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None:
        assert len(ours) == len(theirs)
        return
    assert margins[first] < tie and first >= min_tokens, (first, margins[first], ours, theirs)


def check_budgets(where, ids, want: list[int], each: int, args, labels=("100%", "25%", "minimum"), **engine) -> None:
    """Each directory or file in where gives the greedy tokens want at expert budgets of 100%, 25% and the minimum
    (top-k experts of each bytes; the labels kept), paging: misses, evictions below 100%, the budget held."""
    from moepage.engine.engine import Engine, EngineConfig

    total = each * len(args.moe_layers) * args.num_experts
    budgets = {"100%": total, "25%": total // 4, "minimum": args.top_k * each}
    for path in where:
        for label in labels:
            e = Engine.load(EngineConfig(str(path), expert_cache_bytes=budgets[label], preload=False, **engine))
            assert greedy(e, ids, len(want)) == want, f"{path} at {label}"
            stats = e.cache.stats.snapshot()
            assert stats["misses"] > 0 and (label == "100%" or stats["evictions"] > 0), (path, label, stats)
            assert e.cache.used_bytes <= e.cache.budget
            e.close()


def check_budgets_from_split_dirs(src, ids, want: list[int], out_root, dtype=torch.bfloat16,
                                  lossless=(False, True), labels=("100%", "25%", "minimum")) -> None:
    """`split` (and `split --lossless`) directories of src give the greedy tokens want (src's, resident) at expert
    budgets of 100%, 25% and the minimum (check_budgets), experts of dtype."""
    from moepage.engine.checkpoint import open_checkpoint
    from moepage.engine.moe import PreparedExpert
    from moepage.surgery.split import split_checkpoint

    a = open_checkpoint(str(src)).args
    dirs = []
    for flag in lossless:
        dirs.append(Path(out_root) / f"split-{flag}")
        split_checkpoint(str(src), str(dirs[-1]), lossless=flag)
    check_budgets(dirs, ids, want, PreparedExpert.nbytes_for(a.hidden_size, a.moe_intermediate_size, dtype), a,
                  labels, tokenizer=False)


def check_serves_over_http(path) -> None:
    """One /v1/completions request (8 greedy tokens of a token-id prompt) answers the engine's own tokens."""
    import httpx

    from server_support import MODEL_ID, load_engine, serving

    engine = load_engine(str(path))
    ids = prompt_ids(12, 400, seed=6)
    want = greedy(engine, ids, 8)
    with serving(engine) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": ids, "max_tokens": 8,
                                                      "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["text"] == engine.tokenizer.decode(want)
    engine.close()


@contextlib.contextmanager
def serving_chat_model(root, tokenizer_dir, make_tokenizer, save_model, ctx: int):
    """A model with a family's chat tokenizer (make_tokenizer(tokenizer_dir, root / "tok"), which returns the
    vocabulary size) and an all-zero lm_head (save_model(..., zero_head=True), for tests that force the output with
    logit_bias) served with a context of ctx tokens: yields (engine, url)."""
    from server_support import load_engine, serving

    root = Path(root)
    vocab = make_tokenizer(tokenizer_dir, root / "tok")
    path = save_model(root / "hf", root / "tok", vocab_size=vocab, zero_head=True, max_position_embeddings=ctx)
    engine = load_engine(str(path), ctx=ctx)
    try:
        with serving(engine) as (url, _):
            yield engine, url
    finally:
        engine.close()


def edited_config_dir(src, out, edit) -> Path:
    """out holding src's config.json changed by edit(config) (in place) and links to src's weights."""
    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    edit(config)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    for f in src.glob("*.safetensors*"):
        (out / f.name).symlink_to(f)
    return out
