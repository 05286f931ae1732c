"""`moepage prefetch owner/repo --profile P --domain D`: fill a lazy model's disk tier with a domain's hot experts,
so `moepage serve owner/repo --lazy` serves that domain without waiting on the Hub (or with no network at all)."""
from __future__ import annotations

import sys

from moepage.cli import size_argument


def register(sub):
    p = sub.add_parser("prefetch", help="fetch a domain's hottest experts of a Hub model into the --lazy disk tier",
                       description="Heat is each expert's share of its layer's selections for the domain in a "
                                   "`moepage profile` JSON; the hottest experts across all layers are fetched first.")
    p.add_argument("model", metavar="MODEL", help="a Hugging Face repo id (owner/repo), as given to serve --lazy")
    p.add_argument("--profile", required=True, help="a `moepage profile` JSON made on this model")
    p.add_argument("--domain", required=True, help="the profile's domain whose experts to fetch")
    p.add_argument("--experts", type=int, default=None, metavar="N",
                   help="how many experts (default: every expert the domain selected, as far as --disk-budget holds)")
    p.add_argument("--disk-budget", type=size_argument, default=None, metavar="SIZE",
                   help="bytes the disk tier may hold (the same flag as serve --lazy; default: no limit)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.set_defaults(func=run)


def hot_experts(profile: dict, domain_name: str) -> list[tuple[int, int]]:
    """(layer, expert) the domain selected, hottest first (share of the layer's selections; ties: layer, expert)."""
    from moepage.surgery.profile_format import domain

    d = domain(profile, domain_name)
    heat = []
    for i, layer in enumerate(profile["model"]["moe_layers"]):
        row = d["count"][i]
        total = sum(row) or 1
        heat += [(-c / total, int(layer), e) for e, c in enumerate(row) if c > 0]
    return [(layer, e) for _, layer, e in sorted(heat)]


def run(args) -> int:
    from moepage.engine.checkpoint import open_checkpoint
    from moepage.paging.budget import human
    from moepage.paging.hub_source import HubTier
    from moepage.progress import bar
    from moepage.server.model_source import resolve_model
    from moepage.surgery.profile_format import load_profile
    from moepage.surgery.selection import check_profile_matches

    if args.experts is not None and args.experts < 0:
        raise ValueError("--experts must be >= 0")
    profile = load_profile(args.profile)
    resolved = resolve_model(args.model, args.revision, lazy=True)
    ckpt = open_checkpoint(resolved.path)
    source = ckpt.experts
    if not isinstance(source, HubTier):
        raise ValueError(f"{resolved.path}: not a lazy Hub model")
    check_profile_matches(profile, ckpt.args)
    keys = hot_experts(profile, args.domain)
    if args.experts is not None:
        keys = keys[: args.experts]
    if args.disk_budget is not None:
        source.tier.resize(args.disk_budget)
        each = max(source.stored_nbytes(layer) for layer in ckpt.args.moe_layers) + (64 << 10)
        fit = int(args.disk_budget) // each
        if len(keys) > fit:
            print(f"--disk-budget {human(args.disk_budget)} holds {fit} of the {len(keys)} experts: the hottest "
                  f"{fit} are fetched", file=sys.stderr)
            keys = keys[:fit]
    before = source.stats.snapshot()["hub_bytes"]
    fetched = 0
    for layer, e in bar(list(reversed(keys)), desc="fetching experts", unit="expert"):  # hottest last: most recent
        fetched += source.ensure(layer, e)
    got = source.stats.snapshot()["hub_bytes"] - before
    print(f"{args.domain}: {len(keys)} experts in the disk tier ({fetched} fetched, {human(got)} from the Hub; "
          f"{len(keys) - fetched} were there already); tier {human(source.tier.used_bytes)} in {source.root}")
    return 0
