"""`moepage profile [MODEL] --domain code=FILES... --domain prose=FILES...`: routing statistics per domain."""
from __future__ import annotations

import os
import sys

from moepage.cli import add_engine_arguments, add_model_argument, engine_config, model_path


def register(sub):
    p = sub.add_parser("profile", help="record per-domain expert routing statistics (JSON + heatmap PNG)")
    add_model_argument(p)
    p.add_argument("--domain", action="append", nargs="+", required=True, metavar="NAME=FILE",
                   help="a domain and its calibration text files, directories or globs, `**` recursive (repeatable): "
                        "--domain code='src/**/*.py'; files are read only until the domain has --max-tokens")
    p.add_argument("-o", "--output", default="profile.json", help="profile JSON path (default profile.json)")
    p.add_argument("--heatmap", default=None, help="heatmap PNG path (default: the JSON path with .png)")
    p.add_argument("--no-heatmap", action="store_true", help="do not draw the heatmap")
    p.add_argument("--heatmap-metric", default="share", choices=["share", "saliency", "avg_gate"],
                   help="what the heatmap colours: share of routed tokens, REAP saliency, or mean router weight")
    p.add_argument("--max-seq", type=int, default=512, help="tokens per forward pass (default 512)")
    p.add_argument("--max-tokens", type=int, default=65536,
                   help="calibration tokens per domain at most (default 65536)")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moepage.engine.engine import Engine
    from moepage.surgery.heatmap import MatplotlibMissing, write_heatmap
    from moepage.surgery.profile import list_sources, parse_domain_args, profile_engine
    from moepage.surgery.profile_format import load_profile, write_profile

    if args.max_seq < 2 or args.max_tokens < 2:
        raise ValueError("--max-seq and --max-tokens must be at least 2")
    patterns = parse_domain_args(args.domain)
    sources = {name: list_sources(p, name) for name, p in patterns.items()}
    engine = Engine.load(engine_config(args, model_path(args.model)))
    try:
        profile = profile_engine(engine, sources, args.max_seq, args.max_tokens)
    finally:
        engine.close()
    write_profile(profile, args.output)
    profile = load_profile(args.output)
    print(f"wrote {args.output}")
    for name, d in sorted(profile["domains"].items()):
        print(f"  {name}: {d['tokens']} tokens, nll {d['nll']:.3f}")
    spec = ", ".join("-" if s is None else f"{s:.2f}" for s in profile["specialization"])
    print(f"  specialization per MoE layer: {spec}")
    if not args.no_heatmap:
        png = args.heatmap or os.path.splitext(args.output)[0] + ".png"
        try:
            print(f"wrote {write_heatmap(profile, png, args.heatmap_metric)}")
        except MatplotlibMissing as e:
            print(f"note: {e}", file=sys.stderr)
    return 0
