#!/usr/bin/env python
"""Rebuild the built-in demo model (moepage/demo_model/) from text already on this machine, on CPU.

    nice -n 19 python scripts/train_demo.py [--work build/demo] [--threads 2]

Stages (each writes under --work and is skipped when its output exists, so a re-run resumes):
  1 tokenizer   byte-level BPE (4096) trained on a balanced sample of the four domains' training files
  2 corpus      code / prose / c_headers / shell token streams, 1 file in 10 held out (corpus.manifest.json)
  3 dense       a fresh dense Qwen2 (4 layers, hidden 256, FFN 384) trained with next-token loss
  4 upcycle     -> Qwen2-MoE: 4 routed experts (copies of the FFN, 30% of neurons re-drawn) + 1 shared, top-1
  5 named       trained in named mode: router cross-entropy sends domain i to routed expert i, plus next-token
                loss and distillation from the dense model's top-16 logits; top-level def/class blocks of the code
                domain are added as ChatML answers to templated Python questions (with_chat_examples)
  6 probe       held-out perplexity per domain (dense and MoE), routing accuracy and separation per layer, PNG
  7 package     bf16 weights + tokenizer + model card into moepage/demo_model/
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moepage.demo import FIM_TOKENS  # noqa: E402
from moepage.surgery.corpus import CorpusSpec, DomainCorpus, build_corpus, domain_texts_for_tokenizer  # noqa: E402
from moepage.surgery.dense_init import DenseSpec, init_dense  # noqa: E402
from moepage.surgery.tokenizer_builder import build_tokenizer, save_tokenizer  # noqa: E402
from moepage.surgery.train import TrainConfig, train  # noqa: E402
from moepage.surgery.trainable_model import TrainableDecoder  # noqa: E402
from moepage.surgery.upcycle import UpcycleConfig, upcycle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "moepage", "demo_model")
VOCAB = 4096
CORPUS = CorpusSpec(chars_per_domain=1_500_000)
DENSE = DenseSpec(model_type="qwen2", vocab_size=0, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=384,
                  max_position=2048, tie_word_embeddings=True, seed=0)
DENSE_TRAIN = TrainConfig(mode="lm", steps=2400, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=50,
                          save_every=100, log_every=20, seed=0)
UPCYCLE = UpcycleConfig(experts=4, shared=1, top_k=1, drop=0.3, seed=0)
NAMED_TRAIN = TrainConfig(mode="named", steps=400, batch_size=8, seq_len=128, lr=1.5e-3, warmup_steps=20,
                          router_coef=0.1, distill_coef=0.5, distill_topk=16, save_every=50, log_every=10, seed=1)


def stage(name: str, done_marker: str, timings: dict, fn):
    if os.path.exists(done_marker):
        print(f"[{name}] done already ({done_marker})")
        return
    print(f"[{name}] ...", flush=True)
    t = time.perf_counter()
    fn()
    timings[name] = round(time.perf_counter() - t, 1)
    print(f"[{name}] {timings[name]} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "demo"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=PACKAGE_DIR)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    timings_path = os.path.join(a.work, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    tok_dir = os.path.join(a.work, "tokenizer")
    corpus_path = os.path.join(a.work, "corpus.npz")
    dense_dir, moe0_dir, moe_dir = (os.path.join(a.work, n) for n in ("dense", "moe-upcycled", "moe-named"))

    def make_tokenizer():
        tok = build_tokenizer(domain_texts_for_tokenizer(CORPUS), vocab_size=VOCAB)
        tok.add_special_tokens(list(FIM_TOKENS))
        info = save_tokenizer(tok, tok_dir)
        json.dump(info, open(os.path.join(tok_dir, "info.json"), "w"))

    def make_corpus():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
        build_corpus(tok, CORPUS, separator_id=tok.token_to_id("<|endoftext|>")).save(corpus_path)

    def train_dense():
        info = json.load(open(os.path.join(tok_dir, "info.json")))
        spec = DenseSpec(**{**DENSE.__dict__, "vocab_size": info["vocab_size"]})
        model = init_dense(spec, eos_token_id=info["eos_token_id"])
        result = train(model, DomainCorpus.load(corpus_path), DENSE_TRAIN, os.path.join(a.work, "dense-run"))
        model.save_pretrained(dense_dir, tokenizer_from=tok_dir)
        _generation_config(dense_dir, info)
        json.dump(result, open(os.path.join(dense_dir, "train_result.json"), "w"))

    def do_upcycle():
        upcycle(dense_dir, moe0_dir, UPCYCLE)

    def train_named():
        model = TrainableDecoder.from_pretrained(moe0_dir)
        teacher = TrainableDecoder.from_pretrained(dense_dir)
        corpus = with_chat_examples(DomainCorpus.load(corpus_path), tok_dir)
        result = train(model, corpus, NAMED_TRAIN, os.path.join(a.work, "named-run"),
                       teacher=teacher)
        model.save_pretrained(moe_dir, tokenizer_from=moe0_dir)
        json.dump(result, open(os.path.join(moe_dir, "train_result.json"), "w"))

    def run_probe():
        from moepage.surgery.probe import ProbeConfig, probe, write_routing_png
        corpus = DomainCorpus.load(corpus_path)
        cfg = ProbeConfig(tokens_per_domain=4096, seq_len=256, named=True)
        results = {name: probe(TrainableDecoder.from_pretrained(d), corpus, cfg)
                   for name, d in (("dense", dense_dir), ("upcycled", moe0_dir), ("named", moe_dir))}
        json.dump(results, open(os.path.join(a.work, "probe.json"), "w"), indent=1, sort_keys=True)
        try:
            write_routing_png(results["named"], os.path.join(a.work, "routing.png"))
        except ImportError as e:
            print(f"[probe] no PNG: {e}")

    def run_elastic():
        from moepage.surgery.elastic import NAMED_EXPERTS_KEY
        cfg_path = os.path.join(moe_dir, "config.json")
        config = json.load(open(cfg_path))
        config.setdefault(NAMED_EXPERTS_KEY, {d: i for i, d in enumerate(DomainCorpus.load(corpus_path).domains)})
        json.dump(config, open(cfg_path, "w"), indent=2, sort_keys=True)
        rows = measure_elastic(moe_dir, DomainCorpus.load(corpus_path))
        json.dump(rows, open(os.path.join(a.work, "elastic.json"), "w"), indent=1)

    def package():
        model = TrainableDecoder.from_pretrained(moe_dir)
        if os.path.isdir(a.out):
            shutil.rmtree(a.out)
        model.save_pretrained(a.out, dtype=torch.bfloat16, tokenizer_from=moe_dir)
        info = json.load(open(os.path.join(tok_dir, "info.json")))
        _generation_config(a.out, info)
        for name in ("routing.png", "elastic.png", "corpus.manifest.json"):
            if os.path.exists(os.path.join(a.work, name)):
                shutil.copyfile(os.path.join(a.work, name), os.path.join(a.out, name))
        write_demo_card(a.out, a.work, timings)

    steps = [("tokenizer", os.path.join(tok_dir, "info.json"), make_tokenizer),
             ("corpus", corpus_path, make_corpus),
             ("dense", os.path.join(dense_dir, "config.json"), train_dense),
             ("upcycle", os.path.join(moe0_dir, "config.json"), do_upcycle),
             ("named", os.path.join(moe_dir, "config.json"), train_named),
             ("probe", os.path.join(a.work, "probe.json"), run_probe),
             ("elastic", os.path.join(a.work, "elastic.json"), run_elastic),
             ("package", os.path.join(a.out, "README.md"), package)]
    for name, marker, fn in steps:
        stage(name, marker, timings, fn)
        json.dump(timings, open(timings_path, "w"), indent=1)
    return 0


CODE_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"
CHAT_PROMPT = "Write a Python function that reads a file and returns its lines."


CHAT_QUESTIONS = (
    "Write a Python function that reads a file and returns its lines.", "Show me some Python code.",
    "How do I do this in Python?", "Write a Python class for this.", "Can you write the Python code for it?",
    "Write a function in Python.", "Give me an example in Python.", "Implement this in Python, please.",
)


def with_chat_examples(corpus: DomainCorpus, tok_dir: str, max_answer_tokens: int = 120) -> DomainCorpus:
    """Named-stage data: every top-level `def`/`class` block of the code domain's training text becomes a ChatML
    answer (its first 120 tokens) to one of eight templated Python questions, appended to the code stream, so a
    chat request about Python is answered with code. Held-out data and the other domains are unchanged."""
    import re

    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    end = tok.encode("<|im_end|>\n").ids
    text = tok.decode(corpus.train["code"].tolist())
    blocks = re.split(r"\n(?=(?:def|class) )", text)[1:]
    examples = []
    for n, block in enumerate(blocks):
        question = CHAT_QUESTIONS[n % len(CHAT_QUESTIONS)]
        head = tok.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n").ids
        examples += head + tok.encode(block.strip("\n")).ids[:max_answer_tokens] + end
    code = np.concatenate([corpus.train["code"], np.asarray(examples, np.int32)]).astype(np.int32)
    return DomainCorpus(corpus.domains, {**corpus.train, "code": code}, corpus.heldout, corpus.manifest)


def elastic_modes(num_experts: int) -> list[tuple[str, dict]]:
    """(label, {'elastic': ElasticConfig kwargs, 'cache_experts': experts the cache may hold, None = all})."""
    return [
        ("full: top-1 of 4 routed + shared", {"elastic": {}, "cache_experts": None}),
        ("top-2 (--experts-per-token 2)", {"elastic": {"experts_per_token": 2}, "cache_experts": None}),
        ("code expert only (--restrict-to-domain code)", {"elastic": {"restrict_to": (0,)}, "cache_experts": None}),
        ("shared expert only (--shared-only)", {"elastic": {"shared_only": True}, "cache_experts": None}),
        ("cache 1 expert/layer, exact routing", {"elastic": {}, "cache_experts": 4}),
        ("cache 1 expert/layer, cache-aware margin 0.2", {"elastic": {"cache_margin": 0.2}, "cache_experts": 4}),
    ]


def measure_elastic(model_dir: str, corpus: DomainCorpus, tokens_per_domain: int = 4096, decode_tokens: int = 48):
    """The elastic modes of elastic_modes() on model_dir (see measure_rows)."""
    rows = [{"mode": label, "model": model_dir, **mode} for label, mode in elastic_modes(4)]
    return measure_rows(rows, corpus, tokens_per_domain=tokens_per_domain, decode_tokens=decode_tokens)


def model_params(model_dir: str, experts_per_token: int | None = None, shared_only: bool = False) -> dict:
    """Parameters of a checkpoint: total, and active per token (resident + the routed experts a token runs)."""
    from moepage.engine.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    try:
        a = ckpt.args
        resident = sum(ckpt.read_tensor(n).numel() for n in ckpt.resident_checkpoint_names().values())
        expert = 3 * a.hidden_size * a.moe_intermediate_size
        layers = len(a.moe_layers)
        k = 0 if shared_only else (experts_per_token or a.top_k)
        return {"total": resident + a.num_experts * expert * layers, "active": resident + k * expert * layers}
    finally:
        close = getattr(ckpt, "close", None)
        if close:
            close()


def measure_rows(rows: list[dict], corpus: DomainCorpus, tokens_per_domain: int = 4096, seq_len: int = 256,
                 decode_tokens: int = 48, decode_runs: int = 7, dtype: str = "bfloat16") -> list[dict]:
    """Each row: {"mode": label, "model": dir, "elastic": ElasticConfig kwargs, "cache_experts": experts the cache
    may hold (None = all)}. Measured through the moepage Engine on the same held-out windows for every row:
    perplexity per domain (first tokens_per_domain tokens, seq_len windows), resident weight bytes, peak bytes of
    routed experts held, cache hit rate over scoring + decoding, params total/active, and decode tok/s: the median
    of decode_runs greedy runs, taken round-robin over all rows (engines open together) so that a load spike on a
    shared machine hits every row alike."""
    import math
    import statistics

    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.moe import PreparedExpert
    from moepage.engine.sampling import SamplingParams
    from moepage.surgery.elastic import ElasticConfig, apply_elastic
    from moepage.surgery.probe import ProbeConfig, windows

    engines, out = [], []
    try:
        for row in rows:
            model_dir = row["model"]
            cache_bytes = None
            if row.get("cache_experts") is not None:
                probe_engine = Engine.load(EngineConfig(model=model_dir, dtype=dtype, prefetch=False))
                each = PreparedExpert.nbytes_for(probe_engine.args.hidden_size, probe_engine.args.moe_intermediate_size,
                                                 getattr(torch, dtype))
                probe_engine.close()
                cache_bytes = row["cache_experts"] * each
            engine = Engine.load(EngineConfig(model=model_dir, dtype=dtype, expert_cache_bytes=cache_bytes,
                                              prefetch=False, preload=False))  # page in what routing uses
            engines.append(engine)
            cfg = ElasticConfig(**row.get("elastic", {}))
            apply_elastic(engine, cfg)
            ppl, tokens, peak = {}, {}, 0
            for domain in corpus.domains:
                data = windows(corpus.heldout[domain], ProbeConfig(tokens_per_domain=tokens_per_domain, seq_len=seq_len))
                nll, n = 0.0, 0
                for ids in data.tolist():
                    logits = engine.logits_all(ids[:-1]).float()
                    nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
                    n += len(ids) - 1
                    peak = max(peak, engine.model.cache.used_bytes)
                ppl[domain], tokens[domain] = round(math.exp(nll / n), 2), n
            params = model_params(model_dir, cfg.experts_per_token, cfg.shared_only)
            out.append({"mode": row["mode"], "model": os.path.relpath(model_dir, ROOT), "perplexity": ppl,
                        "tokens": tokens, "resident_bytes": engine.plan.resident_bytes, "expert_bytes_peak": peak,
                        "params_total": params["total"], "params_active": params["active"], "decode_tok_s_runs": []})
            print(f"[measure] {out[-1]}", flush=True)
        prompt = engines[0].tokenizer.encode(CODE_PROMPT)
        params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
        for _ in range(decode_runs):
            for engine, result in zip(engines, out):
                list(engine.generate(prompt, params))
                result["decode_tok_s_runs"].append(round(engine.last_stats.decode_tps, 1))
                result["expert_bytes_peak"] = max(result["expert_bytes_peak"], engine.model.cache.used_bytes)
        for engine, result in zip(engines, out):
            result["decode_tok_s"] = round(statistics.median(result["decode_tok_s_runs"]), 1)
            result["hit_rate"] = round(engine.model.cache.stats.snapshot()["hit_rate"], 3)
            print(f"[decode] {result['mode']}: {result['decode_tok_s']} tok/s {result['decode_tok_s_runs']}, "
                  f"hit rate {result['hit_rate']}", flush=True)
    finally:
        for engine in engines:
            engine.close()
    return out


def sample_generations(model_dir: str) -> dict:
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.sampling import SamplingParams

    engine = Engine.load(EngineConfig(model=model_dir, dtype="bfloat16"))
    try:
        params = SamplingParams(max_tokens=60, temperature=0.0)
        out = {}
        for name, ids in (("completion", engine.tokenizer.encode(CODE_PROMPT)),
                          ("chat", engine.tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}]))):
            out[name] = "".join(step.text for step in engine.generate(ids, params))
        return out
    finally:
        engine.close()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def write_demo_card(out_dir: str, work: str, timings: dict):
    """README.md: what the model is, how it was built and how long it took, measured quality, honest limits."""
    probe_results = json.load(open(os.path.join(work, "probe.json")))
    manifest = json.load(open(os.path.join(work, "corpus.manifest.json")))
    elastic_path = os.path.join(work, "elastic.json")
    elastic = json.load(open(elastic_path)) if os.path.exists(elastic_path) else []
    dense_result = json.load(open(os.path.join(work, "dense", "train_result.json")))
    named_result = json.load(open(os.path.join(work, "moe-named", "train_result.json")))
    model = TrainableDecoder.from_pretrained(out_dir)
    args = model.args
    total = sum(p.numel() for p in model.parameters())
    expert = 3 * args.hidden_size * args.moe_intermediate_size
    active = total - (args.num_experts - args.top_k) * expert * len(args.moe_layers)
    dense_params = sum(p.numel() for p in TrainableDecoder.from_pretrained(os.path.join(work, "dense")).parameters())
    size = os.path.getsize(os.path.join(out_dir, "model.safetensors"))
    domains = manifest["domains"]
    samples = sample_generations(out_dir)
    train_minutes = (timings.get("dense", 0) + timings.get("named", 0)) / 60
    L = []
    w = L.append
    w("# moepage demo model: a tiny Qwen2-MoE with named domain experts\n")
    w("The model `moepage serve` runs when no model is given. It was trained from scratch on one CPU machine "
      "(2 shared cores) from text that was already on it, then sparse-upcycled into a Mixture-of-Experts whose "
      "routed experts are *named*: " + ", ".join(f"`{d}` -> expert {i}" for i, d in enumerate(domains)) +
      ", plus one always-on shared expert. It is a mechanism demo, not a useful assistant: read *How good is it*.\n")
    w("| | |\n|---|---|")
    w(f"| architecture | Qwen2-MoE (`Qwen2MoeForCausalLM`), {args.num_layers} layers, hidden {args.hidden_size}, "
      f"{args.num_heads} heads / {args.num_kv_heads} kv heads, tied embeddings |")
    w(f"| experts | {args.num_experts} routed (FFN {args.moe_intermediate_size}) + 1 shared (FFN "
      f"{args.shared_expert_intermediate_size}, sigmoid gate), top-{args.top_k}, every layer sparse |")
    w(f"| vocabulary | {args.vocab_size} (byte-level BPE trained on the same four domains, ChatML template) |")
    w(f"| parameters | {total / 1e6:.2f} M total, {active / 1e6:.2f} M active per token "
      f"(dense base: {dense_params / 1e6:.2f} M) |")
    w(f"| weights | bf16, {_mb(size)} (`model.safetensors`) |")
    dense_tokens = DENSE_TRAIN.steps * DENSE_TRAIN.batch_size * DENSE_TRAIN.seq_len
    named_tokens = NAMED_TRAIN.steps * NAMED_TRAIN.batch_size * NAMED_TRAIN.seq_len
    w(f"| training | {dense_tokens:,} tokens dense ({DENSE_TRAIN.steps} steps) + {named_tokens:,} tokens named-MoE "
      f"({NAMED_TRAIN.steps} steps), {train_minutes:.1f} min of training wall time; final training loss "
      f"{dense_result.get('lm', float('nan')):.2f} (dense) / {named_result.get('lm', float('nan')):.2f} (MoE) |")
    w("")
    w("## Rebuild\n")
    w("```\nnice -n 19 python scripts/train_demo.py    # writes moepage/demo_model/, work files in build/demo/\n"
      "nice -n 19 python scripts/demo_tables.py   # elastic / extraction tables and elastic.png (below)\n```\n")
    w("Stage wall times on the machine that built this copy (2 CPU cores shared with other jobs, so expect less "
      "elsewhere): " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ". Every stage is deterministic "
      "given the same files (seeded init, data order a pure function of the seed); the corpus manifest "
      "(`corpus.manifest.json`) lists every file with its sha256 prefix, split and token count.\n")
    w("## Data (held out: every 10th file)\n")
    w("| domain | expert | source | files | train tokens | held-out tokens |\n|---|---|---|---|---|---|")
    sources = {"code": "Python stdlib `*.py` (+ json, email, http, ... packages; no tests)",
               "prose": "README / `*.md` / `*.txt` under /usr/share/doc", "c_headers": "`/usr/include` C headers",
               "shell": "shell scripts in /usr/bin, /usr/sbin, /etc, /usr/lib, /usr/share"}
    for i, d in enumerate(domains):
        t = manifest["tokens"][d]
        w(f"| {d} | {i} | {sources.get(d, d)} | {len(manifest['files'][d])} | {t['train']:,} | {t['heldout']:,} |")
    w("\n## Pipeline\n")
    w("1. dense Qwen2 from random init, next-token loss, AdamW, warmup + cosine;\n"
      "2. `moepage upcycle --experts 4 --shared 1 --top-k 1 --drop 0.3`: routed experts are copies of the dense FFN "
      "(down_proj halved) with 30% of their neurons re-drawn, the shared expert is the FFN behind a zero-initialised "
      "sigmoid gate (0.5), so with `--drop 0` the MoE computes exactly the dense function;\n"
      "3. `moepage train --mode named`: next-token loss + 0.5 x forward KL to the dense model's top-16 logits + "
      "0.1 x router cross-entropy toward the row's domain expert. In this stage every top-level `def`/`class` "
      "block of the code training text is also added as a ChatML answer to one of eight templated Python questions "
      "(`with_chat_examples` in the script): the only conversations the model has ever seen.\n")
    w("## Results on held-out files\n")
    w("Perplexity per domain (first 4096 held-out tokens of each domain, fp32):\n")
    w("| model | " + " | ".join(domains) + " | mean |\n|---|" + "---|" * (len(domains) + 1))
    for name, label in (("dense", "dense base"), ("upcycled", "upcycled, before MoE training (drop 0.3)"),
                        ("named", "named-expert MoE (this model)")):
        ppl = probe_results[name]["perplexity"]
        w(f"| {label} | " + " | ".join(f"{ppl[d]:.2f}" for d in domains) + f" | {ppl['mean']:.2f} |")
    named = probe_results["named"]
    w("\nRouting accuracy (top-1 router choice == the domain's expert), per layer and mean:\n")
    w("| domain | expert | " + " | ".join(f"layer {j}" for j in named["layers"]) + " | mean |\n|---|---|" +
      "---|" * (len(named["layers"]) + 1))
    for i, d in enumerate(domains):
        acc = named["routing_accuracy"][d]
        w(f"| {d} | {i} | " + " | ".join(f"{v:.1%}" for v in acc["per_layer"]) + f" | {acc['mean']:.1%} |")
    w("| **mean** | | " + " | " * len(named["layers"]) + f"**{named['routing_accuracy']['mean']:.1%}** |")
    w("\nRouting separation per layer (mean pairwise total-variation distance of the domains' expert shares; "
      "0 = all domains routed alike, 1 = disjoint): " +
      ", ".join(f"layer {j}: {v:.2f}" for j, v in zip(named["layers"], named["separation"])) +
      f" (upcycled before training: {', '.join(f'{v:.2f}' for v in probe_results['upcycled']['separation'])}).\n")
    w("![routing share](routing.png)\n")
    tables_path = os.path.join(work, "tables.json")
    if os.path.exists(tables_path):  # scripts/demo_tables.py: elastic modes + extracted models, same tokens
        from demo_tables import render_sections

        w(render_sections(json.load(open(tables_path))))
    elif elastic:
        w("## Elastic serving (moepage Engine, bf16)\n")
        w("| mode | " + " | ".join(domains) + " | resident weights | peak expert cache | cache hit rate | decode tok/s |"
          "\n|---|" + "---|" * (len(domains) + 4))
        for r in elastic:
            hit = "-" if r.get("hit_rate") is None else f"{r['hit_rate']:.0%}"
            w(f"| {r['mode']} | " + " | ".join(f"{r['perplexity'][d]:.2f}" for d in domains) +
              f" | {_mb(r['resident_bytes'])} | {_mb(r['expert_bytes_peak'])} | {hit} | {r['decode_tok_s']:.0f} |")
        w("")
    w("## Samples (greedy, bf16)\n")
    w("Completion prompt:\n\n```python\n" + CODE_PROMPT + samples["completion"] + "\n```\n")
    w(f"Chat prompt *{CHAT_PROMPT}*:\n\n```\n" + samples["chat"] + "\n```\n")
    w("## How good is it\n")
    w(f"Honestly: not good. It saw about {(dense_tokens + named_tokens) / 1e6:.1f} M tokens, thousands of times "
      "fewer than even the smallest useful code models, and has 4 M active parameters. Its held-out perplexities "
      "are in the tens to hundreds; its text is at best *code-shaped* (indentation, `def`, `self.`, `return`, "
      "`import`, punctuation) and never correct or meaningful, and its only conversations were templated: a chat "
      "request gets stdlib-flavoured fragments, not an answer. What it does show: a trained router that "
      "sends each domain to its named expert (table above), shared-expert-only and single-expert serving with "
      "their measured quality cost, and the end-to-end pipeline (dense -> upcycle -> named training -> probe) "
      "running on a laptop-class CPU in minutes. The MoE trained further than the dense base (more steps, a "
      "teacher), so the perplexity rows above are not a fair dense-vs-MoE comparison at equal compute; at this "
      "scale upcycling buys named, individually loadable experts, not quality.\n")
    open(os.path.join(out_dir, "README.md"), "w").write("\n".join(L) + "\n")


def _generation_config(out_dir: str, info: dict):
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": info["eos_token_id"], "pad_token_id": info["pad_token_id"]}, f)


if __name__ == "__main__":
    sys.exit(main())
