"""`moepage prune MODEL --profile P OUT --ratio 0.5`: expert pruning to one global budget."""
from __future__ import annotations

from moepage.cli import add_model_argument, model_path, size_argument
from moepage.commands import plural
from moepage.commands.extract import add_criterion_argument, add_gguf_arguments, print_gguf


def register(sub):
    p = sub.add_parser("prune", help="drop the least used experts (router-weighted activation mass by default) to fit one global budget")
    add_model_argument(p, optional=False)
    p.add_argument("out", help="output directory for the pruned checkpoint")
    p.add_argument("--profile", required=True, help="profile JSON from `moepage profile`")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=float, help="fraction of routed experts to keep, e.g. 0.5")
    budget.add_argument("--keep", type=int, help="experts to keep per MoE layer")
    budget.add_argument("--max-size", type=size_argument, help="total checkpoint size, e.g. 12GB")
    p.add_argument("--domain", action="append", default=None,
                   help="calibration domains to rank by (repeatable; default: all domains of the profile)")
    add_criterion_argument(p)
    p.add_argument("--name", default=None, help="model name for the card (default <base>-pruned-<domains>-<N>e)")
    p.add_argument("--max-shard-size", type=size_argument, default=None,
                   help="largest safetensors shard (default 2GiB)")
    p.add_argument("--eval", action="append", default=None, metavar="FILE",
                   help="held-out text: measure base and new perplexity for the model card (repeatable)")
    add_gguf_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from moepage.surgery.pipeline import prune_model

    r = prune_model(model_path(args.model), args.profile, args.out, ratio=args.ratio, keep=args.keep, max_bytes=args.max_size,
                    domains=args.domain, criterion=args.criterion, overwrite=args.overwrite, name=args.name,
                    max_shard_bytes=args.max_shard_size, eval_files=args.eval,
                    gguf_type=args.gguf_type if args.gguf else None)
    print(f"wrote {r['name']} to {r['out']}: {plural(r['experts_per_layer'], 'expert')} per layer, {r['bytes'] / 2**20:.1f} MiB")
    print_gguf(r)
    print(f"free allocation by {args.criterion} of the same budget (layer: experts): {r['free_allocation']}")
    return 0
