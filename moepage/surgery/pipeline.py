"""End to end: checkpoint + profile -> chosen experts -> smaller MoE or dense checkpoint + model card."""
from __future__ import annotations

import json
import os

from moepage.engine.checkpoint import open_checkpoint
from moepage.surgery.checkpoint_writer import prepare_output_dir
from moepage.surgery.dense import dense_target, write_dense
from moepage.surgery.extract import write_extracted_moe
from moepage.surgery.model_card import model_name, render_model_card
from moepage.surgery.profile_format import combined_domain, domain as profile_domain, load_profile
from moepage.surgery.selection import DEFAULT_CRITERION, check_profile_matches, top_experts_per_layer

SURGERY_RECORD = "moepage_surgery.json"


def _finish(out_dir: str, summary: dict, card: str, record: dict):
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(card)
    with open(os.path.join(out_dir, SURGERY_RECORD), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")


def _check_eval(eval_files: list[str] | None, gguf_type: str | None = None):
    for path in eval_files or []:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: evaluation text file not found")
    if gguf_type is not None:
        from moepage.surgery.gguf_export import GGUF_TYPES

        if gguf_type not in GGUF_TYPES:
            raise ValueError(f"unknown GGUF type {gguf_type!r}; choose from {', '.join(GGUF_TYPES)}")


def _measure(base_dir: str, out_dir: str, name: str, eval_files: list[str] | None) -> dict | None:
    if not eval_files:
        return None
    _check_eval(eval_files)
    from moepage.surgery.quality import quality_table

    return quality_table(base_dir, out_dir, name, eval_files)


def _gguf(out_dir: str, name: str, gguf_type: str | None, summary: dict, notes: list[str]) -> dict | None:
    """Write OUT/<name>.gguf next to the safetensors when asked; its caveats join the card's notes."""
    if gguf_type is None:
        return None
    from moepage.surgery.gguf_export import write_gguf

    r = write_gguf(out_dir, os.path.join(out_dir, f"{name}.gguf"), gguf_type, name)
    summary["gguf_file"] = os.path.basename(r["path"])
    notes.append(f"`{summary['gguf_file']}`: the same weights as GGUF (architecture `{r['architecture']}`, tensor type "
                 f"{gguf_type}, {r['bytes'] / 2**20:.1f} MiB) for llama.cpp and other GGUF runtimes.")
    notes += [f"GGUF: {n}" for n in r["notes"]]
    return {**r, "path": summary["gguf_file"]}


def extract_model(model: str, profile_path: str, domain: str, keep: int, out: str, dense: bool = False,
                  criterion: str = DEFAULT_CRITERION, overwrite: bool = False, name: str | None = None,
                  max_shard_bytes: int | None = None, eval_files: list[str] | None = None,
                  gguf_type: str | None = None) -> dict:
    """`moepage extract`: keep the `keep` best experts per layer for `domain` (gguf_type: also write a GGUF)."""
    _check_eval(eval_files, gguf_type)
    profile = load_profile(profile_path)
    stats = profile_domain(profile, domain)
    ckpt = open_checkpoint(model)
    check_profile_matches(profile, ckpt.args)
    if dense:
        dense_target(ckpt)  # fail before writing anything
    kept = top_experts_per_layer(stats, ckpt.args.moe_layers, keep, criterion)
    out_dir = prepare_output_dir(out, overwrite)
    layers = ckpt.args.moe_layers
    if dense:
        avg_gate = {layer: stats["avg_gate"][row] for row, layer in enumerate(layers)}
        shared = None
        if stats.get("shared_gate") is not None:
            shared = {layer: stats["shared_gate"][row] for row, layer in enumerate(layers)}
        summary = write_dense(ckpt, kept, avg_gate, shared, out_dir, max_shard_bytes)
    else:
        summary = write_extracted_moe(ckpt, kept, out_dir, max_shard_bytes)
    base = profile["model"]["name"]
    name = name or model_name(base, domain, keep, dense)
    notes = []
    if dense and ckpt.args.shared_expert_gate:
        notes.append("The shared expert's sigmoid gate is replaced by its mean on the domain's text (an approximation "
                     "unless the gate is constant).")
    gguf = _gguf(out_dir, name, gguf_type, summary, notes)
    quality = _measure(ckpt.root, out_dir, name, eval_files)
    card = render_model_card(name=name, base=base, family=ckpt.args.family, operation="extract" + (" --dense" if dense else ""),
                             domain=domain, summary=summary, profile=profile, criterion=criterion, notes=notes,
                             quality=quality)
    record = {"quality": quality, "gguf": gguf, "name": name, "operation": "extract", "base": base, "domain": domain, "keep": keep, "dense": dense,
              "criterion": criterion, "profile": os.path.basename(profile_path), **summary}
    _finish(out_dir, summary, card, record)
    return {**record, "out": out_dir}


def prune_model(model: str, profile_path: str, out: str, *, ratio: float | None = None, keep: int | None = None,
                max_bytes: int | None = None, domains: list[str] | None = None, criterion: str = DEFAULT_CRITERION,
                overwrite: bool = False, name: str | None = None, max_shard_bytes: int | None = None,
                eval_files: list[str] | None = None, gguf_type: str | None = None) -> dict:
    """`moepage prune`: one budget for the whole model, experts ranked over a calibration mix of domains."""
    from moepage.surgery.prune import experts_per_layer_for_budget, global_allocation

    _check_eval(eval_files, gguf_type)
    profile = load_profile(profile_path)
    stats = combined_domain(profile, domains)
    ckpt = open_checkpoint(model)
    check_profile_matches(profile, ckpt.args)
    n = experts_per_layer_for_budget(ckpt, ratio=ratio, keep=keep, max_bytes=max_bytes)
    kept = top_experts_per_layer(stats, ckpt.args.moe_layers, n, criterion)
    allocation = global_allocation(stats, ckpt.args.moe_layers, n, criterion)
    out_dir = prepare_output_dir(out, overwrite)
    summary = write_extracted_moe(ckpt, kept, out_dir, max_shard_bytes)
    base = profile["model"]["name"]
    label = "+".join(domains) if domains else "mix"
    name = name or model_name(base, f"{'reap' if criterion in ('saliency', 'reap') else 'pruned'}-{label}", n)
    notes = [f"Global budget: {n} experts in each of {len(ckpt.args.moe_layers)} MoE layers "
             f"({n * len(ckpt.args.moe_layers)} of {ckpt.args.num_experts * len(ckpt.args.moe_layers)}).",
             f"A free per-layer allocation of the same budget by `{criterion}` would keep (layer: experts) "
             f"{allocation}; Hugging Face configs hold one expert count for all layers, so the budget is spread evenly."]
    gguf = _gguf(out_dir, name, gguf_type, summary, notes)
    quality = _measure(ckpt.root, out_dir, name, eval_files)
    card = render_model_card(name=name, base=base, family=ckpt.args.family, operation="prune", domain=label,
                             summary=summary, profile=profile, criterion=criterion, notes=notes, quality=quality)
    record = {"quality": quality, "gguf": gguf, "name": name, "operation": "prune", "base": base, "domains": domains or sorted(profile["domains"]),
              "experts_per_layer": n, "criterion": criterion, "profile": os.path.basename(profile_path),
              "free_allocation": {str(k): v for k, v in allocation.items()}, **summary}
    _finish(out_dir, summary, card, record)
    return {**record, "out": out_dir}
