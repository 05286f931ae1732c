#!/usr/bin/env python
"""The demo model's fine-tune paths, measured: the note's LoRA path and elastic training.

    nice -n 19 python scripts/demo_finetune.py lora     [--work build/demo] [--steps 300]
    nice -n 19 python scripts/demo_finetune.py elastic  [--work build/demo] [--steps 300]
    python scripts/demo_finetune.py card                # the two sections of moepage/demo_model/README.md

lora: profile (demo_tables.py's command) -> `moepage extract --domain code --keep 2` -> `moepage train EXTRACT OUT
  --lora --domains code` on the held-in (training) code -> `moepage publish OUT/merged --dry-run`; every model is then
  scored through the moepage engine in fp32 (the adapter applied with `--lora`, as `serve --lora` applies it) on the
  first 4096 held-out tokens of each domain (256-token windows) and on all held-out code (512-token windows, the
  `extract --eval` numbers). Writes WORK/lora.json.
elastic: `moepage train moepage/demo_model --elastic --elastic-budgets 0,1,2` (named router loss, distilled from the
  shipped model) and, as the control that separates "trained further" from "trained elastic", the same run without
  --elastic; then the elastic table (train_demo.measure_rows: perplexity per domain, memory, tok/s per serving mode)
  for the shipped model, the control and the elastic model. Writes WORK/elastic_train.json. The elastic model stays
  in WORK/elastic (the shipped weights are not replaced).
card: renders both JSON files into the demo card's "Fine-tuning" and "Elastic training" sections.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from demo_tables import PROFILE_FILES_PER_DOMAIN, PROFILE_TOKENS, command_line, rebuild_corpus, rel, run_cli  # noqa: E402
from train_demo import PACKAGE_DIR, ROOT, elastic_modes, measure_rows  # noqa: E402

from moepage.surgery.corpus import DomainCorpus, read_text  # noqa: E402

TOKENS_PER_DOMAIN = 4096
LORA_SECTION = "## Fine-tuning the extracted code model (LoRA)"
ELASTIC_SECTION = "## Elastic training (`moepage train --elastic`)"


def corpus_of(work: str) -> tuple[str, DomainCorpus]:
    path = os.path.join(work, "corpus.npz")
    if not os.path.exists(path):
        rebuild_corpus(os.path.join(PACKAGE_DIR, "corpus.manifest.json"),
                       os.path.join(PACKAGE_DIR, "tokenizer.json")).save(path)
    return path, DomainCorpus.load(path)


def score(model: str, lora: str | None, corpus: DomainCorpus, heldout_text: str) -> dict:
    """Perplexity per domain (first TOKENS_PER_DOMAIN held-out tokens, 256-token windows) and on all held-out code
    (512-token windows), through the moepage engine in fp32 with the adapter merged as serve --lora merges it."""
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.surgery.probe import ProbeConfig, windows
    from moepage.surgery.quality import _score

    engine = Engine.load(EngineConfig(model=model, dtype="float32", lora=lora))
    try:
        ppl = {}
        for domain in corpus.domains:
            nll, n = 0.0, 0
            for ids in windows(corpus.heldout[domain], ProbeConfig(tokens_per_domain=TOKENS_PER_DOMAIN,
                                                                   seq_len=256)).tolist():
                logits = engine.logits_all(ids[:-1]).float()
                nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
                n += len(ids) - 1
            ppl[domain] = round(math.exp(nll / n), 2)
        code_all, tokens = _score(lambda ids: engine.logits_all(ids).float(), engine.tokenizer, [heldout_text], 512,
                                  16384)
        return {"perplexity": ppl, "heldout_code": round(code_all, 2), "heldout_code_tokens": tokens}
    finally:
        engine.close()


def run_lora(a) -> int:
    corpus_path, corpus = corpus_of(a.work)
    manifest = corpus.manifest
    commands: list[str] = []
    profile = os.path.join(a.work, "profile.json")
    argv = ["profile", PACKAGE_DIR, "-o", profile, "--max-tokens", str(PROFILE_TOKENS), "--max-seq", "256"]
    for d in corpus.domains:
        train = [e["path"] for e in manifest["files"][d] if e["split"] == "train"]
        files = train[:: max(1, len(train) // PROFILE_FILES_PER_DOMAIN)][:PROFILE_FILES_PER_DOMAIN]
        argv += ["--domain", f"{d}=" + files[0], *files[1:]]
    if not os.path.exists(profile):
        run_cli(argv, [])
    commands.append(f"moepage profile moepage/demo_model --domain code=<{PROFILE_FILES_PER_DOMAIN} training files, "
                    f"evenly spaced> --domain prose=... --domain c_headers=... --domain shell=... -o {rel(profile)} "
                    f"--max-tokens {PROFILE_TOKENS} --max-seq 256")
    heldout_code = os.path.join(a.work, "heldout-code.py")
    with open(heldout_code, "w") as f:
        f.write("\n".join(read_text(e["path"], 60_000) for e in manifest["files"]["code"] if e["split"] == "heldout"))
    extract = os.path.join(a.work, "extract", "extract2")
    argv = ["extract", PACKAGE_DIR, extract, "--profile", profile, "--domain", "code", "--keep", "2", "--eval",
            heldout_code, "--overwrite"]
    if os.path.exists(os.path.join(extract, "moepage_surgery.json")):
        commands.append(command_line(argv))
    else:
        run_cli(argv, commands)
    out = os.path.join(a.work, "lora-code")
    train_argv = ["train", extract, out, "--lora", "--rank", str(a.rank), "--target", "q_proj,v_proj,experts",
                  "--corpus", corpus_path, "--domains", "code", "--steps", str(a.steps), "--batch-size", "8",
                  "--seq-len", "128", "--lr", str(a.lr), "--warmup", "20", "--save-every", "50", "--log-every", "20",
                  "--seed", "0", "--merge", "--save-dtype", "bfloat16"]
    if not os.path.exists(os.path.join(out, "adapter_model.safetensors")):
        run_cli(train_argv, commands)
    else:
        commands.append(command_line(train_argv))
    run_cli(["publish", os.path.join(out, "merged"), "--repo-id", "you/moepage-demo-code-lora", "--dry-run"], commands)
    with open(heldout_code) as f:
        text = f.read()
    rows = []
    for label, model, lora in (("full demo model (4 of 4 experts)", PACKAGE_DIR, None),
                               ("extracted code, N=2 of 4", extract, None),
                               ("extracted code, N=2 + LoRA (serve --lora)", extract, out),
                               ("extracted code, N=2, LoRA merged (OUT/merged, bf16)", os.path.join(out, "merged"), None)):
        rows.append({"model": label, "path": rel(model), "lora": rel(lora) if lora else None,
                     **score(model, lora, corpus, text)})
        print(f"[score] {rows[-1]}", flush=True)
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    adapter_bytes = os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
    record = {"commands": commands, "rows": rows, "train_log": log[-1], "steps": a.steps, "rank": a.rank,
              "lr": a.lr, "adapter_bytes": adapter_bytes, "train_tokens": corpus.train["code"].size,
              "tokens_per_domain": TOKENS_PER_DOMAIN}
    with open(os.path.join(a.work, "lora.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {rel(os.path.join(a.work, 'lora.json'))}")
    return 0


def run_elastic(a) -> int:
    corpus_path, corpus = corpus_of(a.work)
    commands: list[str] = []
    common = ["--mode", "named", "--teacher", PACKAGE_DIR, "--distill-coef", "0.5", "--corpus", corpus_path,
              "--steps", str(a.steps), "--batch-size", "12", "--seq-len", "128", "--lr", str(a.lr), "--warmup", "20",
              "--save-every", "50", "--log-every", "20", "--seed", "2", "--save-dtype", "bfloat16"]
    runs = {"control": [], "elastic": ["--elastic", "--elastic-budgets", "0,1,2"]}
    for key, extra in runs.items():
        out = os.path.join(a.work, key if key == "elastic" else "elastic-control")
        argv = ["train", PACKAGE_DIR, out, *common, *extra]
        if os.path.exists(os.path.join(out, "model.safetensors")):
            commands.append(command_line(argv))
        else:
            run_cli(argv, commands)
    models = {"shipped": PACKAGE_DIR, "control": os.path.join(a.work, "elastic-control"),
              "elastic": os.path.join(a.work, "elastic")}
    rows = [{"mode": label, "model": path, **mode, "which": which}
            for which, path in models.items() for label, mode in elastic_modes(4)[:4]]
    measured = measure_rows(rows, corpus, tokens_per_domain=TOKENS_PER_DOMAIN, decode_tokens=48,
                            decode_runs=a.decode_runs)
    for row, m in zip(rows, measured):
        m["which"] = row["which"]
    record = {"commands": commands, "rows": measured, "steps": a.steps, "lr": a.lr,
              "train_log": {k: json.loads(open(os.path.join(p, "train_log.jsonl")).read().splitlines()[-1])
                            for k, p in models.items() if k != "shipped"},
              "tokens_per_domain": TOKENS_PER_DOMAIN, "decode_runs": a.decode_runs}
    with open(os.path.join(a.work, "elastic_train.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {rel(os.path.join(a.work, 'elastic_train.json'))}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["lora", "elastic", "card"])
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "demo"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="default: 2e-3 (lora), 1e-3 (elastic)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-runs", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.makedirs(a.work, exist_ok=True)
    if a.what == "lora":
        a.lr = a.lr or 2e-3
        return run_lora(a)
    if a.what == "elastic":
        a.lr = a.lr or 1e-3
        return run_elastic(a)
    from demo_card_finetune import update_card

    update_card(os.path.join(PACKAGE_DIR, "README.md"), a.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
