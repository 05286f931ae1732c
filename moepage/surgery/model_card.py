"""README.md model card for an extracted / pruned / merged model: name, provenance, profile, quality."""
from __future__ import annotations

import math
import re

from moepage import __version__

SOURCES_SHOWN = 5  # calibration files listed per domain in the card

def model_name(base: str, domain: str, n: int, dense: bool = False) -> str:
    """Naming convention: <base>-<domain>-<N>e, with -dense appended for a merged dense model."""
    slug = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")  # noqa: E731
    return f"{slug(base)}-{slug(domain)}-{n}e" + ("-dense" if dense else "")


def _quality_rows(quality: dict | None) -> str:
    if not quality:
        return ("Not measured. `moepage extract/prune ... --eval heldout.txt` measures the perplexity of the base and "
                "the new model (MoE or --dense) on the same tokens.\n")
    lines = ["| model | text | tokens | perplexity | scored by |", "|---|---|---|---|---|"]
    for row in quality.get("rows", []):
        lines.append(f"| {row['model']} | {row['text']} | {row['tokens']} | {row['perplexity']:.3f} | "
                     f"{row.get('scored_by', '-')} |")
    return "\n".join(lines) + "\n"


def render_model_card(*, name: str, base: str, family: str, operation: str, domain: str | None, summary: dict,
                      profile: dict | None, criterion: str, quality: dict | None = None, notes: list[str] | None = None) -> str:
    tags = ["moepage", "mixture-of-experts" if summary["kind"] == "moe" else "dense", "expert-pruning"]
    lines = [
        "---",
        f"base_model: {base}",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {name}",
        "",
        f"Made with moepage {__version__} `{operation}` from **{base}** ({family}).",
        "",
        "## What was done",
        "",
    ]
    if summary["kind"] == "moe":
        lines.append(f"- Kept {summary['experts_per_layer']} routed experts per MoE layer, top-k {summary['top_k']}; "
                     "router rows of the dropped experts removed, the kept experts renumbered in their original order.")
    else:
        lines.append(f"- Merged the kept experts of each MoE layer into one dense SwiGLU FFN "
                     f"(intermediate {summary['intermediate_size']}), each expert's down projection scaled by the "
                     f"domain's average routing weight; written as `{summary['architecture']}`.")
    from moepage.surgery.selection import CRITERION_HELP

    lines.append(f"- Experts ranked by `{criterion}`: {CRITERION_HELP.get(criterion, criterion)}"
                 + (f", measured on domain `{domain}`." if domain else "."))
    if criterion in ("saliency", "reap"):
        lines.append("- Note: REAP saliency is averaged over only the tokens routed to each expert, so it does not "
                     "weigh how often an expert is used; moepage's default, `activation`, multiplies it by the "
                     "selection count.")
    for note in notes or []:
        lines.append(f"- {note}")
    lines += ["", "Kept experts (layer: original indices):", "", "```"]
    lines += [f"{layer}: {experts}" for layer, experts in summary["kept"].items()]
    lines += ["```", ""]
    if profile is not None:
        lines += ["## Profile used", "", f"Profile of `{profile['model']['name']}`, settings {profile.get('settings', {})}.", "",
                  "| domain | tokens | base perplexity | sources (sha256) |", "|---|---|---|---|"]
        for dname, d in sorted(profile["domains"].items()):
            sources = d.get("sources", [])
            srcs = ", ".join(f"{s['path']} ({s['sha256'][:12]})" for s in sources[:SOURCES_SHOWN])
            if len(sources) > SOURCES_SHOWN:
                srcs += f", ... ({len(sources)} files; all listed with sha256 in the profile JSON)"
            ppl = f"{math.exp(d['nll']):.3f}" if d.get("nll") is not None else "-"
            lines.append(f"| {dname} | {d['tokens']} | {ppl} | {srcs} |")
        lines.append("")
    lines += ["## Quality", "", _quality_rows(quality)]
    lines += ["## Files", "", ", ".join(f"`{f}`" for f in summary["files"]) + f" ({summary['bytes'] / 2**20:.1f} MiB of weights)"
              + (f"; GGUF: `{summary['gguf_file']}`" if summary.get("gguf_file") else ""), ""]
    return "\n".join(lines)
