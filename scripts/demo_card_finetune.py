"""The demo card's LoRA and elastic-training sections, rendered from build/demo/lora.json and elastic_train.json
(scripts/demo_finetune.py writes both; `python scripts/demo_finetune.py card` calls update_card)."""
from __future__ import annotations

import json
import os

LORA_SECTION = "## Fine-tuning the extracted code model (LoRA)"
ELASTIC_SECTION = "## Elastic training (`moepage train --elastic`)"
BEFORE = "## How good is it"  # both sections go right before this one (demo_tables.py rewrites the span above)
DOMAINS = ("code", "prose", "c_headers", "shell")


def _pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f}%"


def lora_section(rec: dict) -> str:
    rows = rec["rows"]
    base, extract, lora = rows[0], rows[1], rows[2]
    lines = [LORA_SECTION, "",
             "The note's path end to end (`python scripts/demo_finetune.py lora`): profile the demo model, extract the "
             "code domain's 2 most used experts per layer, fine-tune that extract with LoRA adapters on the held-in "
             "(training) code only, publish (dry run). Commands:", "", "```", *rec["commands"], "```", "",
             f"LoRA rank {rec['rank']} on q_proj, v_proj and every routed expert's gate/up/down, {rec['steps']} steps of "
             f"8 x 128 tokens ({rec['steps'] * 1024:,} tokens drawn from the {rec['train_tokens']:,} held-in code "
             f"tokens), lr {rec['lr']}, next-token loss only; final training loss {rec['train_log']['lm']:.3f}. The "
             f"adapter (`adapter_config.json` + `adapter_model.safetensors`, PEFT key names, fp32) is "
             f"{rec['adapter_bytes'] / 1e6:.2f} MB. Every row is scored through the moepage engine in fp32; the LoRA "
             "row loads the adapter as `moepage serve EXTRACT --lora OUT` does (merged into the resident weights at "
             "load and into each expert as it pages in), the merged row is `OUT/merged` (bf16).", "",
             f"| model | {' | '.join(DOMAINS)} | all held-out code ({rows[0]['heldout_code_tokens']} tokens) |",
             "|---|" + "---|" * (len(DOMAINS) + 1)]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['perplexity'][d]:.2f}" for d in DOMAINS)
                     + f" | {r['heldout_code']:.2f} |")
    lines += ["", f"Reading: on held-out code the fine-tune moves the extract from {extract['heldout_code']:.2f} to "
                  f"{lora['heldout_code']:.2f} ({_pct(lora['heldout_code'], extract['heldout_code'])}; the full model: "
                  f"{base['heldout_code']:.2f}), first 4096 tokens {extract['perplexity']['code']:.2f} -> "
                  f"{lora['perplexity']['code']:.2f}. The other domains, which it was not trained on, move "
                  + ", ".join(f"{d} {_pct(lora['perplexity'][d], extract['perplexity'][d])}" for d in DOMAINS[1:])
                  + ". The code files are the Python stdlib: held-out files are other modules of the same library, so "
                    "this measures adaptation to that library's style as much as to code.", ""]
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def elastic_section(rec: dict) -> str:
    rows = rec["rows"]
    which = {"shipped": "shipped", "control": "control (same training, no --elastic)", "elastic": "elastic"}
    lines = [ELASTIC_SECTION, "",
             "`python scripts/demo_finetune.py elastic`: the shipped model fine-tuned for every serving budget: each "
             "row of a batch is routed as one budget serves (0 = `--shared-only`, 1 = the model's own top-1, 2 = "
             "`--experts-per-token 2`; budgets rotate over rows and steps), with the shipped recipe's losses (named "
             "router loss, 0.5 x distillation from the shipped model). The control is the same run without "
             f"`--elastic`, so the difference is the elastic routing, not the extra {rec['steps']} steps. Commands:",
             "", "```", *rec["commands"], "```", "",
             f"Perplexity per domain (first {rec['tokens_per_domain']} held-out tokens, 256-token windows, engine, "
             f"bf16); decode tok/s: median of {rec['decode_runs']} runs of 48 greedy tokens, round-robin over all rows "
             "on a shared 2-core machine (noise ~20%).", "",
             f"| mode | model | {' | '.join(DOMAINS)} | memory | decode tok/s |", "|---|---|" + "---|" * (len(DOMAINS) + 2)]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for r in (r for r in rows if r["mode"] == mode):
            lines.append(f"| {mode} | {which[r['which']]} | " + " | ".join(f"{r['perplexity'][d]:.2f}" for d in DOMAINS)
                         + f" | {_mb(r['resident_bytes'] + r['expert_bytes_peak'])} | {r['decode_tok_s']} |")
    get = {(r["which"], r["mode"]): r for r in rows}
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    full, shared = modes[0], next(m for m in modes if m.startswith("shared"))

    def mean(r):
        return sum(r["perplexity"][d] for d in DOMAINS) / len(DOMAINS)

    parts = []
    for m in modes:
        c, e = get[("control", m)], get[("elastic", m)]
        parts.append(f"{m.split(' (')[0]}: {mean(c):.2f} -> {mean(e):.2f} ({_pct(mean(e), mean(c))})")
    lines += ["", "Mean perplexity over the four domains, control -> elastic: " + "; ".join(parts) + ".",
              f"Shared expert only against full, same model: shipped {_pct(mean(get[('shipped', shared)]), mean(get[('shipped', full)]))}, "
              f"control {_pct(mean(get[('control', shared)]), mean(get[('control', full)]))}, "
              f"elastic {_pct(mean(get[('elastic', shared)]), mean(get[('elastic', full)]))}.", "",
              "Reading: the elastic routing is what moves the shared-expert-only row (the control, trained as long "
              f"on the same data, does not: shared-only {_pct(mean(get[('control', shared)]), mean(get[('shipped', shared)]))} "
              f"against the shipped model, elastic {_pct(mean(get[('elastic', shared)]), mean(get[('shipped', shared)]))}), "
              f"at a full-model cost of {_pct(mean(get[('elastic', full)]), mean(get[('control', full)]))} against the "
              "control. Top-2 and the code-expert-only rows barely move: the routed experts were trained already and the "
              "budgets 1 and 2 share them. Both fine-tunes are worse than the shipped model on code with the full model "
              f"(control {_pct(get[('control', full)]['perplexity']['code'], get[('shipped', full)]['perplexity']['code'])}, "
              f"elastic {_pct(get[('elastic', full)]['perplexity']['code'], get[('shipped', full)]['perplexity']['code'])}): "
              "further steps at this learning rate over all four domains trade code for prose. So the shipped weights "
              "are not replaced; the elastic checkpoint stays in build/demo/elastic. Retraining the named stage from the "
              "upcycled model with --elastic (train_demo.py's 400 steps) is the fair test and is not done here.", ""]
    return "\n".join(lines)


def update_card(readme: str, work: str, reading: str = ""):
    """Replace (or insert before BEFORE) the two sections, from the JSON files that exist."""
    sections = []
    if os.path.exists(os.path.join(work, "lora.json")):
        sections.append(lora_section(json.load(open(os.path.join(work, "lora.json")))))
    if os.path.exists(os.path.join(work, "elastic_train.json")):
        sections.append(elastic_section(json.load(open(os.path.join(work, "elastic_train.json")))) + reading)
    with open(readme) as f:
        text = f.read()
    for title in (LORA_SECTION, ELASTIC_SECTION):  # drop an earlier rendering
        start = text.find(title)
        if start >= 0:
            end = text.find("\n## ", start + len(title))
            text = text[:start] + text[end + 1:]
    at = text.find(BEFORE)
    if at < 0:
        raise SystemExit(f"{readme}: no '{BEFORE}' section to insert before")
    with open(readme, "w") as f:
        f.write(text[:at] + "\n".join(s.rstrip() + "\n" for s in sections) + "\n" + text[at:])
