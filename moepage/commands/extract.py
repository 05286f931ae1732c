"""`moepage extract MODEL --profile P --domain code --keep N OUT [--dense]`: a domain's experts as a smaller model."""
from __future__ import annotations

from moepage.cli import add_model_argument, model_path, size_argument
from moepage.commands import plural
from moepage.surgery.selection import CRITERIA, CRITERION_HELP, DEFAULT_CRITERION


def add_criterion_argument(p):
    p.add_argument("--criterion", default=DEFAULT_CRITERION, choices=CRITERIA,
                   help="how experts are ranked: " + "; ".join(f"{c}: {h}" for c, h in CRITERION_HELP.items()
                                                              if c != "reap")
                   + f" (reap = saliency). Default {DEFAULT_CRITERION}.")


def add_gguf_arguments(p):
    p.add_argument("--gguf", action="store_true",
                   help="also write OUT/<name>.gguf (llama.cpp architecture and tokenizer metadata) next to the safetensors")
    p.add_argument("--gguf-type", default="auto", choices=["auto", "f32", "f16", "bf16", "q8_0"],
                   help="GGUF tensor type (auto: the checkpoint's dtype; norms and routers stay F32)")


def print_gguf(r: dict):
    if r.get("gguf"):
        print(f"wrote {r['gguf']['path']} (GGUF {r['gguf']['architecture']}, {r['gguf']['bytes'] / 2**20:.1f} MiB)")
        for note in r["gguf"]["notes"]:
            print(f"note: {note}")


def register(sub):
    p = sub.add_parser("extract", help="keep a domain's N most used experts per layer (smaller MoE, or --dense)")
    add_model_argument(p, optional=False)
    p.add_argument("out", help="output directory for the new checkpoint")
    p.add_argument("--profile", required=True, help="profile JSON from `moepage profile`")
    p.add_argument("--domain", required=True, help="domain of the profile whose experts to keep")
    p.add_argument("--keep", type=int, required=True, help="experts kept per MoE layer (top-k is clamped to it)")
    p.add_argument("--dense", action="store_true",
                   help="merge the kept experts of each layer into one dense FFN and write the family's dense model")
    add_criterion_argument(p)
    p.add_argument("--name", default=None, help="model name for the card (default <base>-<domain>-<N>e)")
    p.add_argument("--max-shard-size", type=size_argument, default=None, help="largest safetensors shard (default 2GiB)")
    p.add_argument("--eval", action="append", default=None, metavar="FILE",
                   help="held-out text: measure base and new perplexity for the model card (MoE or --dense; repeatable)")
    add_gguf_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from moepage.surgery.pipeline import extract_model

    r = extract_model(model_path(args.model), args.profile, args.domain, args.keep, args.out, dense=args.dense,
                      criterion=args.criterion, overwrite=args.overwrite, name=args.name,
                      max_shard_bytes=args.max_shard_size, eval_files=args.eval,
                      gguf_type=args.gguf_type if args.gguf else None)
    what = f"dense {r['architecture']} (intermediate {r['intermediate_size']})" if args.dense else \
        f"MoE with {plural(r['experts_per_layer'], 'expert')} per layer, top-{r['top_k']}"
    print(f"wrote {r['name']} to {r['out']}: {what}, {r['bytes'] / 2**20:.1f} MiB")
    print_gguf(r)
    return 0
