"""GGUF files made by llama.cpp's own tools, served by moepage: same greedy tokens as llama.cpp (F16, Q8_0,
Q4_K_M), same tokens from the .gguf, its split shards and a 25% expert budget, experts kept quantized."""
from __future__ import annotations

import os

import pytest
import torch

from gguf_support import LlamaCppGreedy, convert, find_converter, llama_cpp_module, make_gguf_source, quantize
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.quantized_expert import QuantizedExpert
from moepage.engine.sampling import SamplingParams
from moepage.paging.gguf_file import GGUFFile

FAMILY = "qwen3_moe"
N_TOKENS = 32


@pytest.fixture(scope="session")
def qwen3_ggufs(tmp_path_factory, tokenizer_dir):
    """{'hf', 'f32', 'f16', 'q8_0', 'q4_k_m', 'split_q4_k_m'}: one tiny Qwen3-MoE in every form, built once."""
    llama_cpp_module()
    root = tmp_path_factory.mktemp("gguf-qwen3")
    converter = find_converter(str(root))
    hf = make_gguf_source(root / "hf", FAMILY, tokenizer_dir)
    paths = {"hf": str(hf), "f32": str(root / "m-f32.gguf"), "f16": str(root / "m-f16.gguf")}
    convert(converter, [(hf, paths["f32"], "f32"), (hf, paths["f16"], "f16")])
    paths["q8_0"] = quantize(paths["f16"], str(root / "m-q8_0.gguf"), "LLAMA_FTYPE_MOSTLY_Q8_0")
    paths["q4_k_m"] = quantize(paths["f16"], str(root / "m-q4_k_m.gguf"), "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    from moepage.surgery.split_gguf import split_gguf

    paths["split_q4_k_m"] = str(root / "split-q4_k_m")
    split_gguf(paths["q4_k_m"], paths["split_q4_k_m"])
    return paths


def prompt(engine) -> list[int]:
    return engine.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")


def greedy(engine, ids: list[int], n: int = N_TOKENS) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [s.token for s in engine.generate(ids, params)]


def load(path, **kw) -> Engine:
    return Engine.load(EngineConfig(path, dtype=kw.pop("dtype", "float32"), **kw))


def llama_cpp_tokens(path: str, ids: list[int], n: int = N_TOKENS):
    llm = LlamaCppGreedy(path)
    try:
        return llm.generate(ids, n)
    finally:
        llm.close()


def test_f32_gguf_logits_equal_the_hf_checkpoint(qwen3_ggufs):
    hf, gg = load(qwen3_ggufs["hf"]), load(qwen3_ggufs["f32"])
    ids = prompt(gg)
    diff = (hf.logits_all(ids) - gg.logits_all(ids)).abs().max().item()
    assert diff < 1e-4, f"max abs logit diff {diff}"
    assert gg.tokenizer.encode("hello world <|im_end|>") == hf.tokenizer.encode("hello world <|im_end|>")
    assert gg.tokenizer.chat_template == hf.tokenizer.chat_template
    hf.close(), gg.close()


# Largest |moepage - llama.cpp| logit difference seen per file type on this model (llama.cpp rounds activations,
# the KV cache and attention to f16 / 8-bit blocks; moepage multiplies float32 activations), with headroom.
TOLERANCE = {"f16": 0.02, "q8_0": 0.2, "q4_k_m": 0.35}
CANDIDATE_PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "import os\nimport sys\n\ndef main():\n",
    "class Stack:\n    def push(self, item):\n",
    "for i in range(10):\n    print(i)\n",
    "The quick brown fox jumps over the lazy dog.",
    "with open(path) as f:\n    data = f.read()\n",
    "try:\n    import json\nexcept ImportError:\n",
    "Hello! How can I help you today?",
]


def decisive_prompt(llm: LlamaCppGreedy, engine, n: int = N_TOKENS):
    """The first candidate prompt on which llama.cpp's own greedy run never has a top-2 logit margin below
    twice the measured moepage/llama.cpp logit gap on that run (a near-tie any rounding difference flips)."""
    for text in CANDIDATE_PROMPTS:
        ids = engine.tokenizer.encode(text)
        tokens, rows = llm.generate(ids, n)
        margins = [float(torch.from_numpy(r).topk(2).values.diff().abs()) for r in rows]
        if min(margins) > 2 * teacher_forced_gap(engine, rows, ids, tokens):
            return ids, tokens
    return None, None


def teacher_forced_gap(engine, llm_rows, ids, tokens) -> float:
    """max |moepage - llama.cpp| over the logits that chose each of llama.cpp's tokens."""
    ours = engine.logits_all(ids + tokens)[len(ids) - 1 : len(ids) - 1 + len(tokens)]
    theirs = torch.stack([torch.from_numpy(r) for r in llm_rows])
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_logits_track_llama_cpp(qwen3_ggufs, kind):
    """Teacher-forced on llama.cpp's own 32 greedy tokens, every logit is within the file type's tolerance."""
    engine = load(qwen3_ggufs[kind])
    ids = prompt(engine)
    tokens, rows = llama_cpp_tokens(qwen3_ggufs[kind], ids)
    gap = teacher_forced_gap(engine, rows, ids, tokens)
    print(f"\n{kind}: max |moepage - llama.cpp| logit over 32 steps = {gap:.4f}")
    assert gap < TOLERANCE[kind]
    engine.close()


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_greedy_tokens_equal_llama_cpp(qwen3_ggufs, kind):
    """32 greedy tokens identical to llama.cpp's on a prompt without near-ties (chosen by llama.cpp's margins)."""
    engine = load(qwen3_ggufs[kind])
    llm = LlamaCppGreedy(qwen3_ggufs[kind])
    try:
        ids, theirs = decisive_prompt(llm, engine)
    finally:
        llm.close()
    if ids is None:
        pytest.xfail(f"{kind}: every candidate prompt has a llama.cpp top-2 margin below twice the logit gap "
                     f"within 32 tokens; the random tiny model's ties decide, see test_logits_track_llama_cpp")
    assert greedy(engine, ids) == theirs
    engine.close()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.mark.parametrize("kind,n", [("f16", 32), ("q8_0", 32), ("q4_k_m", 16)])
def test_greedy_agrees_until_a_near_tie(qwen3_ggufs, kind, n):
    """Free-running greedy on a fixed prompt: tokens equal llama.cpp's, or the first divergence is a near-tie
    in llama.cpp's own logits (margin within the file type's tolerance), reported with its margin."""
    path = qwen3_ggufs[kind]
    engine = load(path)
    ids = prompt(engine)
    ours = greedy(engine, ids, n)
    theirs, rows = llama_cpp_tokens(path, ids, n)
    i = first_divergence(ours, theirs)
    if i is not None:
        row = torch.from_numpy(rows[i])
        margin = (row[theirs[i]] - row[ours[i]]).item()
        print(f"\n{kind}: first divergence at token {i}: llama.cpp margin {margin:.4f} "
              f"(tolerance {TOLERANCE[kind]}), tokens equal before it")
        assert margin < TOLERANCE[kind], f"diverged at token {i} with llama.cpp margin {margin:.4f}: not a near-tie"
    engine.close()


def test_same_tokens_from_gguf_split_and_a_quarter_budget(qwen3_ggufs):
    full = load(qwen3_ggufs["q4_k_m"])
    ids = prompt(full)
    want = greedy(full, ids)
    per_expert = full.plan.expert_bytes_each
    total = full.plan.expert_bytes_total
    full.close()
    split = load(qwen3_ggufs["split_q4_k_m"])
    assert split.ckpt.kind == "split" and split.ckpt.experts.quantized
    assert greedy(split, ids) == want
    split.close()
    paged_split = load(qwen3_ggufs["split_q4_k_m"], expert_cache_bytes=total // 4)
    assert paged_split.plan.fraction_resident < 1 and "--lossless" not in paged_split.memory_summary()  # quantized
    paged_split.close()
    quarter = load(qwen3_ggufs["q4_k_m"], expert_cache_bytes=total // 4)
    assert quarter.plan.fraction_resident <= 0.25 + 1e-9 and quarter.cache.budget >= 2 * per_expert
    assert greedy(quarter, ids) == want
    assert quarter.cache.stats.evictions > 0, "a 25% budget must evict"
    quarter.close()


@pytest.mark.parametrize("kind", ["q4_k_m", "split_q4_k_m"])
def test_embedding_read_from_disk_under_a_budget_gives_the_same_bits(qwen3_ggufs, kind):
    """Under --memory-budget the GGML-encoded token_embd is read a row at a time and stays out of the budget."""
    full = load(qwen3_ggufs[kind], dtype="bfloat16")
    ids = prompt(full)
    want = greedy(full, ids, 16)
    paged = load(qwen3_ggufs[kind], dtype="bfloat16", memory_budget=64 << 20)
    on_disk = paged.ckpt.gguf.info("token_embd.weight").nbytes
    assert paged.model.embed is None and paged.plan.on_disk_bytes == on_disk
    assert paged.plan.resident_bytes == full.plan.resident_bytes - on_disk
    rows = torch.tensor([0, 3, ids[0], full.args.vocab_size - 1])
    assert torch.equal(paged.model.embed_rows(rows), torch.nn.functional.embedding(rows, full.model.embed))
    assert greedy(paged, ids, 16) == want
    with pytest.raises(IndexError, match="outside the embedding table"):
        paged.model.embed_rows(torch.tensor([full.args.vocab_size]))
    full.close()
    paged.close()


def test_experts_stay_quantized_in_cache_and_budget(qwen3_ggufs):
    path = qwen3_ggufs["q4_k_m"]
    f = GGUFFile(path)
    types = {f.tensors[f"blk.{L}.ffn_{p}_exps.weight"].type.name for L in range(2) for p in ("gate", "up", "down")}
    assert types <= {"Q4_K", "Q6_K"} and "Q4_K" in types, f"expected K-quant experts, got {types}"
    on_disk = sum(f.tensors[f"blk.{L}.ffn_{p}_exps.weight"].nbytes for L in range(2) for p in ("gate", "up", "down"))
    f.close()
    engine = load(path, dtype="bfloat16")
    greedy(engine, prompt(engine), 8)
    entries = [engine.cache.acquire(k) for k in sorted(engine.cache.resident_keys)]
    assert entries and all(isinstance(e, QuantizedExpert) for e in entries)
    for k in sorted(engine.cache.resident_keys):
        engine.cache.release(k)
    per_layer = [engine.ckpt.experts.stored_nbytes(L) * engine.args.num_experts for L in engine.args.moe_layers]
    assert sum(per_layer) == on_disk  # each expert is stored at its quantized size
    # the cache holds every expert in a slot like the largest layer's (Q4_K_M mixes Q4_K and Q6_K down
    # projections), its three parts each widened to whole 4 KiB pages for O_DIRECT reads
    n = engine.args.num_experts * len(per_layer)
    slack = n * 3 * 2 * 4096
    assert on_disk <= engine.plan.expert_bytes_total <= max(per_layer) * len(per_layer) + slack
    bf16_bytes = 2 * 3 * 256 * 256 * 8 * 2
    assert engine.cache.used_bytes <= on_disk + slack and on_disk < bf16_bytes / 3
    engine.close()


def test_resident_memory_close_to_file_size(qwen3_ggufs):
    """Everything resident (dequantized resident weights in bf16 + every expert quantized) vs the file."""
    path = qwen3_ggufs["q4_k_m"]
    engine = load(path, dtype="bfloat16")
    greedy(engine, prompt(engine), 4)
    for layer in engine.args.moe_layers:  # page every expert in
        for e in range(engine.args.num_experts):
            with engine.cache.use((layer, e)):
                pass
    held = engine.plan.resident_bytes + engine.cache.used_bytes
    size = os.path.getsize(path)
    print(f"\nQ4_K_M file {size} bytes; moepage holds {held} bytes ({held / size:.2f}x): resident "
          f"{engine.plan.resident_bytes} + experts {engine.cache.used_bytes}")
    # The tiny test model is 40% non-expert weights (held as bf16); a 30B MoE is ~5% and lands near 1.05x.
    assert held < 2.0 * size
    engine.close()


@pytest.fixture(scope="module")
def demo_ggufs(tmp_path_factory):
    """The trained demo model (decisive logits, unlike random tiny models) converted by llama.cpp to F16 and
    quantized to Q8_0. llama.cpp's qwen2moe graph needs output.weight, so the tied embedding is written out."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from moepage.demo import SHIPPED_DIR

    llama_cpp_module()
    root = tmp_path_factory.mktemp("demo-gguf")
    converter = find_converter(str(root))
    hf = root / "hf"
    shutil.copytree(SHIPPED_DIR, hf)
    weights = load_file(str(hf / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (hf / "config.json").write_text(json.dumps(config))
    f16 = str(root / "demo-f16.gguf")
    convert(converter, [(hf, f16, "f16")])
    return {"f16": f16, "q8_0": quantize(f16, str(root / "demo-q8_0.gguf"), "LLAMA_FTYPE_MOSTLY_Q8_0")}


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_trained_demo_model_greedy_equals_llama_cpp_for_32_tokens(demo_ggufs, kind):
    """On a trained model the logit margins are decisive: 32 greedy tokens identical to llama.cpp's own, F16 and
    Q8_0 (measured gaps: |moepage - llama.cpp| logits 0.007 for F16, 0.15 for Q8_0)."""
    engine = load(demo_ggufs[kind])
    ids = engine.tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n")
    theirs, _ = llama_cpp_tokens(demo_ggufs[kind], ids)
    assert greedy(engine, ids) == theirs
    engine.close()
