#!/usr/bin/env python
"""Measure the demo model's elastic serving modes and its extracted code models on the same held-out tokens, and
write build/demo/tables.json, moepage/demo_model/elastic.png and the tables in moepage/demo_model/README.md.

    nice -n 19 python scripts/demo_tables.py [--work build/demo] [--threads 1]

Stages (each cached under --work; delete a file to redo its stage):
  1 corpus   the demo's files, re-read from the paths in moepage/demo_model/corpus.manifest.json, checked against
             its sha256 prefixes and per-file token counts and tokenized with the packaged tokenizer (the same
             corpus.npz train_demo.py writes, without retraining anything)
  1b base    (unless --no-base) the dense base and the upcycled MoE before named training, rebuilt with
             train_demo.py's own settings (DENSE, DENSE_TRAIN, UPCYCLE) on that corpus, since the package ships only
             the final model (about 10 min of CPU at 1 thread)
  2 profile  `moepage profile` of the demo model on each domain's first training files
  3 extract  `moepage extract` of the code domain: --keep 1 and 2 of 4, each also --dense (with --eval on the
             held-out code), plus --keep 1 --criterion saliency (REAP per routed token, the old default)
  4 measure  train_demo.measure_rows for every row on the same windows; a dense result is served by the engine as
             a one-expert MoE (a router with one row: its weight is exactly 1), checked against the dense forward
  5 report   elastic.png and the README sections (render_sections)
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from train_demo import (DENSE, DENSE_TRAIN, PACKAGE_DIR, ROOT, UPCYCLE, _generation_config,  # noqa: E402
                        elastic_modes, measure_rows)

from moepage.surgery.corpus import CorpusSpec, DomainCorpus, build_corpus, read_text  # noqa: E402

PROFILE_FILES_PER_DOMAIN = 40
PROFILE_TOKENS = 8192
TOKENS_PER_DOMAIN = 4096
SHORT = {  # labels for the PNG legend
    "full": "full (top-1 + shared)", "top2": "top-2", "restrict": "code expert only", "shared": "shared only",
    "cache1": "cache 1/layer, exact", "cache1ca": "cache 1/layer, cache-aware 0.2",
}


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


# ---- 1 corpus ----------------------------------------------------------------------------------------------

def rebuild_corpus(manifest_path: str, tokenizer_path: str) -> DomainCorpus:
    """The demo corpus from the manifest's own file list, verified file by file."""
    import hashlib

    from tokenizers import Tokenizer

    with open(manifest_path) as f:
        manifest = json.load(f)
    spec = CorpusSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["spec"].items()})
    texts = {}
    for domain in spec.domains:
        items = []
        for entry in manifest["files"][domain]:
            text = read_text(entry["path"], spec.max_chars_per_file)
            if text is None or hashlib.sha256(text.encode()).hexdigest()[:16] != entry["sha256"]:
                raise SystemExit(f"{entry['path']}: missing or changed since the demo model was built")
            items.append((entry["path"], text))
        texts[domain] = items
    tok = Tokenizer.from_file(tokenizer_path)
    corpus = build_corpus(tok, spec, separator_id=tok.token_to_id("<|endoftext|>"), texts=texts)
    for domain in spec.domains:
        got = [e["tokens"] for e in corpus.manifest["files"][domain]]
        want = [e["tokens"] for e in manifest["files"][domain]]
        if got != want:
            raise SystemExit(f"domain {domain}: token counts differ from the manifest (tokenizer changed?)")
    return corpus


def rebuild_base(work: str, corpus_path: str, model: str) -> tuple[str, str]:
    """(dense dir, upcycled dir): train_demo's dense stage and upcycle stage, using the packaged tokenizer."""
    from moepage.surgery.dense_init import DenseSpec, init_dense
    from moepage.surgery.train import train
    from moepage.surgery.upcycle import upcycle

    dense_dir, moe0_dir = os.path.join(work, "dense"), os.path.join(work, "moe-upcycled")
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    info = {"vocab_size": config["vocab_size"], "eos_token_id": config["eos_token_id"], "pad_token_id": 0}
    if not os.path.exists(os.path.join(dense_dir, "config.json")):
        print("[base] training the dense base (train_demo.py's dense stage) ...", flush=True)
        spec = DenseSpec(**{**DENSE.__dict__, "vocab_size": info["vocab_size"]})
        dense = init_dense(spec, eos_token_id=info["eos_token_id"])
        result = train(dense, DomainCorpus.load(corpus_path), DENSE_TRAIN, os.path.join(work, "dense-run"))
        dense.save_pretrained(dense_dir, tokenizer_from=model)
        _generation_config(dense_dir, info)
        with open(os.path.join(dense_dir, "train_result.json"), "w") as f:
            json.dump(result, f)
    if not os.path.exists(os.path.join(moe0_dir, "config.json")):
        upcycle(dense_dir, moe0_dir, UPCYCLE)
    return dense_dir, moe0_dir


# ---- 3 extract / 4 measure helpers -------------------------------------------------------------------------

def dense_as_one_expert_moe(dense_dir: str, out_dir: str) -> str:
    """A dense Qwen2 checkpoint rewritten as a Qwen2-MoE with one routed expert (the FFN), top-1, a zero router
    row and no shared expert: softmax over one logit is exactly 1, so it computes the dense function, and the
    moepage engine (which serves MoE models) can measure its speed and memory like the other rows."""
    from safetensors.torch import load_file, save_file

    from moepage.surgery.checkpoint_writer import copy_tokenizer, write_json

    with open(os.path.join(dense_dir, "config.json")) as f:
        config = json.load(f)
    if config["model_type"] != "qwen2":
        raise ValueError(f"{dense_dir}: expected a dense qwen2 checkpoint")
    tensors = load_file(os.path.join(dense_dir, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if ".mlp." in name:
            layer, part = name.split(".")[2], name.split(".")[-2]  # model.layers.L.mlp.gate_proj.weight
            out[f"model.layers.{layer}.mlp.experts.0.{part}.weight"] = t
            if part == "gate_proj":
                out[f"model.layers.{layer}.mlp.gate.weight"] = torch.zeros(1, t.shape[1], dtype=t.dtype)
        else:
            out[name] = t
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    moe = {**config, "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 1,
           "num_experts_per_tok": 1, "moe_intermediate_size": config["intermediate_size"],
           "shared_expert_intermediate_size": 0, "decoder_sparse_step": 1, "mlp_only_layers": [],
           "norm_topk_prob": False, "qkv_bias": True}
    write_json(os.path.join(out_dir, "config.json"), moe)
    copy_tokenizer(dense_dir, out_dir)
    check_same_function(dense_dir, out_dir)
    return out_dir


def check_same_function(dense_dir: str, moe_dir: str):
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.surgery.trainable_model import TrainableDecoder

    ids = list(range(10, 90))
    with torch.no_grad():
        want = TrainableDecoder.from_pretrained(dense_dir)(torch.tensor([ids])).logits[0]
    engine = Engine.load(EngineConfig(model=moe_dir, dtype="float32"))
    try:
        diff = (engine.logits_all(ids) - want).abs().max().item()
    finally:
        engine.close()
    if diff > 1e-4:
        raise SystemExit(f"{moe_dir}: the one-expert MoE differs from the dense model by {diff}")
    print(f"[dense-as-moe] {rel(moe_dir)} computes the dense function (fp32 max abs logit diff {diff:.1e})")


def command_line(argv: list[str]) -> str:
    return "moepage " + " ".join(shlex.quote(rel(a) if a.startswith(ROOT) else a) for a in argv)


def run_cli(argv: list[str], log: list[str]):
    from moepage.cli import main

    log.append(command_line(argv))
    print(f"$ {log[-1][:200]}", flush=True)
    if main(argv) != 0:
        raise SystemExit(f"failed: {log[-1]}")


# ---- 5 report -----------------------------------------------------------------------------------------------

def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _m(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def render_sections(tables: dict) -> str:
    """The README sections: elastic serving + extracted models (one table), the PNG, the extraction table."""
    domains = tables["domains"]
    rows = tables["rows"]
    counts = ", ".join(f"{d} {rows[0]['tokens'][d]}" for d in domains)
    L = []
    w = L.append
    w("## Elastic serving and extracted models (moepage Engine, bf16)\n")
    w(f"Every row is served by the moepage engine (bf16, {tables['threads']} torch thread) and scored on the same "
      f"held-out tokens: the first {tables['tokens_per_domain']} of each domain, in {tables['seq_len']}-token windows "
      f"({counts} predicted tokens). Resident weights are "
      "everything but the routed experts; peak expert cache is the routed experts actually paged in; memory is "
      "their sum (the KV cache, 1-2 MB here, is left out). Cache hit rate counts scoring and decoding. Active parameters are the ones one token runs. The `--dense` rows are the merged dense Qwen2 "
      "served as a one-expert MoE (exactly the dense function, checked to 1e-4 against the dense forward), so "
      "their speed comes from the same engine. Decode tok/s: median of "
      f"{tables['decode_runs']} greedy runs of {tables['decode_tokens']} tokens after a code prompt, taken "
      "round-robin over all rows on a shared 2-core machine; at this size a decode step is mostly Python overhead "
      "per layer, so differences under ~20% are noise: compare rows, not machines.\n")
    w("| mode | " + " | ".join(domains) + " | params total / active | resident weights | peak expert cache | "
      "memory | cache hit rate | decode tok/s |\n|---|" + "---|" * (len(domains) + 6))
    for r in rows:
        w(f"| {r['mode']} | " + " | ".join(f"{r['perplexity'][d]:.2f}" for d in domains) +
          f" | {_m(r['params_total'])} / {_m(r['params_active'])} | {_mb(r['resident_bytes'])} | "
          f"{_mb(r['expert_bytes_peak'])} | {_mb(r['resident_bytes'] + r['expert_bytes_peak'])} | "
          f"{r['hit_rate']:.0%} | {r['decode_tok_s']:.0f} |")
    if tables.get("base_note"):
        w("\n" + tables["base_note"])
    w("\n![perplexity per domain against memory and decode speed, per mode](elastic.png)\n")
    full = next(r for r in rows if r["key"] == "full")
    ext = [r for r in rows if r["key"].startswith("extract")]
    w("## Extracting the code experts (`moepage extract`)\n")
    w(f"Profile: {tables['profile_note']}. Commands:\n")
    w("```\n" + "\n".join(tables["commands"]) + "\n```\n")
    w("Perplexity per domain (same tokens as above) and the change against the full model; experts kept per layer "
      "(original indices, layers 0-3) from `moepage_surgery.json`:\n")
    w("| model | kept experts | " + " | ".join(domains) + " | code vs full | file |\n|---|---|" +
      "---|" * (len(domains) + 2))
    w(f"| full demo model (4 of 4) | all | " + " | ".join(f"{full['perplexity'][d]:.2f}" for d in domains) +
      f" | - | {_mb(tables['files']['full'])} |")
    for r in ext:
        delta = r["perplexity"]["code"] / full["perplexity"]["code"] - 1
        w(f"| {r['mode']} | {r['kept']} | " + " | ".join(f"{r['perplexity'][d]:.2f}" for d in domains) +
          f" | {delta:+.1%} | {_mb(tables['files'][r['key']])} |")
    w("")
    if tables.get("eval"):
        w(f"The `--eval` rows of each extracted model's card (all held-out code, {tables['eval']['tokens']} tokens in "
          f"512-token windows, fp32): base {tables['eval']['base']:.2f}; " +
          "; ".join(f"{k}: {v:.2f}" for k, v in tables["eval"]["perplexity"].items()) + ".\n")
    w(reading(tables) + "\n")
    return "\n".join(L)


def reading(tables: dict) -> str:
    """A few sentences of what the measured rows say, computed from them (so they cannot go stale)."""
    rows = {r["key"]: r for r in tables["rows"]}
    full = rows["full"]
    others = [d for d in tables["domains"] if d != "code"]

    def pct(r, d):
        return f"{r['perplexity'][d] / full['perplexity'][d] - 1:+.1%}"

    def span(r):
        return ", ".join(f"{d} {pct(r, d)}" for d in others)

    mem = lambda r: (r["resident_bytes"] + r["expert_bytes_peak"]) / 1e6  # noqa: E731
    out = [f"Reading against the full model ({mem(full):.1f} MB): the shared expert alone ({mem(rows['shared']):.1f} MB) "
           f"costs code {pct(rows['shared'], 'code')} and {span(rows['shared'])} - coherent, measurably worse.",
           f"Restricting to the code expert ({mem(rows['restrict']):.1f} MB) or extracting it (N=1) keeps code at "
           f"{pct(rows['extract1'], 'code')} and costs the domains whose experts are gone ({span(rows['extract1'])}).",
           f"Merging it into a dense FFN (`--dense`, N=1) costs code {pct(rows['extract1d'], 'code')}: the shared "
           "expert's per-token gate becomes its domain mean."]
    if "extract1r" in rows:
        out.append(f"Ranking by REAP saliency alone (the old default) keeps experts "
                   f"{rows['extract1r']['kept']} (layers 0-3, against {rows['extract1']['kept']}) and costs code {pct(rows['extract1r'], 'code')} instead of "
                   f"{pct(rows['extract1'], 'code')}.")
    out.append(f"With a cache of one expert per layer, cache-aware routing (margin 0.2) raises the hit rate from "
               f"{rows['cache1']['hit_rate']:.0%} to {rows['cache1ca']['hit_rate']:.0%} at a perplexity change in the "
               "second decimal.")
    return " ".join(out)


def write_png(tables: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, rows = tables["domains"], tables["rows"]
    markers = "osD^vP*Xhp<>"
    fig, axes = plt.subplots(2, len(domains), figsize=(4.2 * len(domains), 8.2), squeeze=False)
    for j, d in enumerate(domains):
        for i, r in enumerate(rows):
            style = dict(marker=markers[i % len(markers)], s=70, color=plt.cm.tab10(i % 10), label=r["short"],
                         edgecolors="black", linewidths=0.5)
            axes[0][j].scatter((r["resident_bytes"] + r["expert_bytes_peak"]) / 1e6, r["perplexity"][d], **style)
            axes[1][j].scatter(r["decode_tok_s"], r["perplexity"][d], **style)
        axes[0][j].set_title(f"{d}")
        axes[0][j].set_xlabel("memory: resident + peak expert cache (MB)")
        axes[1][j].set_xlabel("decode tok/s (median of runs)")
        for k in (0, 1):
            axes[k][j].grid(alpha=0.3)
            axes[k][j].set_ylabel("held-out perplexity" if j == 0 else "")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=9, frameon=False)
    fig.suptitle(f"moepage demo model: elastic modes and extracted code models "
                 f"(bf16, {tables['tokens_per_domain']} held-out tokens per domain)")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_readme(readme: str, sections: str):
    """Replace everything from the first elastic/extraction section up to `## Samples` with `sections`."""
    with open(readme) as f:
        text = f.read()
    starts = [i for i in (text.find("## Elastic serving"), text.find("## Extracting the code experts")) if i >= 0]
    end = text.find("## Samples")
    if not starts or end < 0:
        raise SystemExit(f"{readme}: no '## Elastic serving' ... '## Samples' span to replace")
    with open(readme, "w") as f:
        f.write(text[: min(starts)] + sections + "\n" + text[end:])


# ---- main -----------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "demo"))
    ap.add_argument("--model", default=PACKAGE_DIR)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-readme", action="store_true", help="do not touch the README (tables.json + PNG only)")
    ap.add_argument("--no-base", action="store_true", help="skip the dense-base and upcycled rows (no training)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    model = a.model

    corpus_path = os.path.join(a.work, "corpus.npz")
    if not os.path.exists(corpus_path):
        rebuild_corpus(os.path.join(model, "corpus.manifest.json"), os.path.join(model, "tokenizer.json")).save(corpus_path)
    corpus = DomainCorpus.load(corpus_path)
    manifest = corpus.manifest
    base_rows = []
    if not a.no_base:
        dense_dir, moe0_dir = rebuild_base(a.work, corpus_path, model)
        base_rows = [
            {"key": "dense", "mode": "dense base (Qwen2 before upcycling; served as a 1-expert MoE)",
             "model": dense_as_one_expert_moe(dense_dir, os.path.join(a.work, "served", "dense")), "elastic": {},
             "cache_experts": None, "short": "dense base"},
            {"key": "upcycled", "mode": "upcycled MoE before named training (drop 0.3)", "model": moe0_dir,
             "elastic": {}, "cache_experts": None, "short": "upcycled, untrained"},
        ]

    commands: list[str] = []
    profile = os.path.join(a.work, "profile.json")
    if not os.path.exists(profile):
        argv = ["profile", model, "-o", profile, "--max-tokens", str(PROFILE_TOKENS), "--max-seq", "256"]
        for d in corpus.domains:
            train = [e["path"] for e in manifest["files"][d] if e["split"] == "train"]
            files = train[:: max(1, len(train) // PROFILE_FILES_PER_DOMAIN)][:PROFILE_FILES_PER_DOMAIN]
            argv += ["--domain", f"{d}=" + files[0], *files[1:]]
        run_cli(argv, [])
    commands.append(f"moepage profile moepage/demo_model --domain code=<{PROFILE_FILES_PER_DOMAIN} training files, evenly spaced> "
                    f"--domain prose=... --domain c_headers=... --domain shell=... -o {rel(profile)} "
                    f"--max-tokens {PROFILE_TOKENS} --max-seq 256")
    heldout_code = os.path.join(a.work, "heldout-code.py")
    with open(heldout_code, "w") as f:
        f.write("\n".join(read_text(e["path"], 60_000) for e in manifest["files"]["code"] if e["split"] == "heldout"))

    extract_root = os.path.join(a.work, "extract")
    extracts = [("extract1", "extracted code, N=1 of 4 (25%)", ["--keep", "1"]),
                ("extract2", "extracted code, N=2 of 4 (50%)", ["--keep", "2"]),
                ("extract1d", "extracted code, N=1, --dense", ["--keep", "1", "--dense"]),
                ("extract2d", "extracted code, N=2, --dense", ["--keep", "2", "--dense"]),
                ("extract1r", "extracted code, N=1, --criterion saliency (old default)",
                 ["--keep", "1", "--criterion", "saliency"])]
    for key, _, flags in extracts:
        out = os.path.join(extract_root, key)
        argv = ["extract", model, out, "--profile", profile, "--domain", "code", *flags, "--eval", heldout_code,
                "--overwrite"]
        if os.path.exists(os.path.join(out, "moepage_surgery.json")):
            commands.append(command_line(argv))
        else:
            run_cli(argv, commands)

    records = {key: json.load(open(os.path.join(extract_root, key, "moepage_surgery.json"))) for key, _, _ in extracts}
    rows = base_rows + [{"key": k, "mode": label, "model": model, **mode, "short": SHORT[k]}
                        for k, (label, mode) in zip(SHORT, elastic_modes(4))]
    for key, label, _ in extracts:
        if key == "extract1r" and records[key]["kept"] == records["extract1"]["kept"]:
            continue  # REAP keeps the same experts here: nothing to show
        served = os.path.join(extract_root, key)
        if records[key]["dense"]:
            served = dense_as_one_expert_moe(served, os.path.join(a.work, "served", key))
        kept = "; ".join(f"{','.join(map(str, v))}" for _, v in sorted(records[key]["kept"].items()))
        rows.append({"key": key, "mode": label, "model": served, "elastic": {}, "cache_experts": None,
                     "short": label.replace("extracted code, ", "extract "), "kept": kept})
    measured = measure_rows(rows, corpus, tokens_per_domain=TOKENS_PER_DOMAIN, decode_tokens=48, decode_runs=7)
    for row, m in zip(rows, measured):
        m.update(key=row["key"], short=row["short"], **({"kept": row["kept"]} if "kept" in row else {}))

    files = {"full": os.path.getsize(os.path.join(model, "model.safetensors"))}
    files.update({k: sum(os.path.getsize(os.path.join(extract_root, k, f)) for f in r["files"]) for k, r in records.items()})
    labels = {key: label for key, label, _ in extracts}
    evals = {labels[k]: r["quality"]["rows"] for k, r in records.items() if r.get("quality")}
    tables = {
        "domains": corpus.domains, "rows": measured, "tokens_per_domain": TOKENS_PER_DOMAIN, "seq_len": 256,
        "threads": a.threads, "decode_runs": 7, "decode_tokens": 48, "commands": commands, "files": files,
        "profile_note": f"`moepage profile` of the demo model on {PROFILE_FILES_PER_DOMAIN} evenly spaced training files of "
                        f"each domain ({PROFILE_TOKENS} tokens each; held-out files are never profiled); experts "
                        "ranked by the default criterion, router-weighted activation mass",
        "eval": {"tokens": next(iter(evals.values()))[0]["tokens"], "base": next(iter(evals.values()))[0]["perplexity"],
                 "perplexity": {label: rows_[1]["perplexity"] for label, rows_ in evals.items()}} if evals else None,
        "base_note": "The dense-base and upcycled rows are a re-trained copy (train_demo.py's settings, 1 thread), "
                     "since only the final model ships: their perplexities differ from the first table's, which "
                     "are the original run's (fp32)." if base_rows else "",
    }
    with open(os.path.join(a.work, "tables.json"), "w") as f:
        json.dump(tables, f, indent=1)
    png = os.path.join(model, "elastic.png")
    write_png(tables, png)
    write_png(tables, os.path.join(a.work, "elastic.png"))  # train_demo.py's package stage copies it back
    print(f"wrote {rel(os.path.join(a.work, 'tables.json'))} and {rel(png)}")
    if not a.no_readme:
        update_readme(os.path.join(model, "README.md"), render_sections(tables))
        print(f"updated {rel(os.path.join(model, 'README.md'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
