"""`moepage serve | generate | inspect | split | verify | ...`"""
from __future__ import annotations

import argparse
import sys

from moepage.paging.budget import parse_size


def add_engine_arguments(p: argparse.ArgumentParser):
    p.add_argument("--memory-budget", type=parse_size, default=None,
                   help="bytes for resident weights + KV cache + expert cache, e.g. 6GB, 6GiB, 512MiB (default: unlimited)")
    p.add_argument("--expert-cache", type=parse_size, default=None,
                   help="bytes for the expert cache alone (overrides the share --memory-budget leaves)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (checkpoint's), float32, bfloat16, float16")
    p.add_argument("--ctx-size", type=int, default=None, help="KV cache length in tokens (default min(model max, 4096))")
    p.add_argument("--policy", default="auto",
                   help="expert cache eviction policy: lru | lfu | stale | auto (stale when the cache holds fewer experts "
                        "than one token uses, else lru)")
    p.add_argument("--io-threads", type=int, default=2, help="threads reading experts from disk")
    p.add_argument("--no-prefetch", action="store_true", help="read experts only when a layer needs them")
    p.add_argument("--pregate", action="store_true",
                   help="during decode, read the experts the next layer's router picks for the current hidden state "
                        "(pre-gating; measured slower on the bench model, see README)")
    p.add_argument("--secretary", default=None, metavar="PROFILE",
                   help="a `moepage profile` JSON: guess each prompt's domain and prefetch its hottest experts")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="record every expert access (JSON lines) for `moepage bench --replay`")
    p.add_argument("--threads", type=int, default=None, help="torch compute threads")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of split shards at first page-in")


def engine_config(args, model: str):
    from moepage.engine.engine import EngineConfig

    return EngineConfig(
        model=model, memory_budget=args.memory_budget, expert_cache_bytes=args.expert_cache, dtype=args.dtype,
        ctx_size=args.ctx_size, policy=args.policy, io_threads=args.io_threads, prefetch=not args.no_prefetch,
        threads=args.threads, device=args.device, verify_shards=not args.no_verify,
        pregate=args.pregate, trace=args.trace, secretary=args.secretary,
        # an approximate routing mode reads fewer experts: page in what it uses rather than everything at load
        preload=False if _elastic(args) else None,
    )


def _elastic(args) -> bool:
    return bool(getattr(args, "shared_only", False) or getattr(args, "experts_per_token", None)
                or getattr(args, "restrict_to_domain", None) or getattr(args, "cache_aware_margin", None))




def build_parser() -> argparse.ArgumentParser:
    from moepage import __version__
    from moepage.commands import register_all

    parser = argparse.ArgumentParser(prog="moepage", description="Serve MoE LLMs bigger than memory.")
    parser.add_argument("--version", action="version", version=f"moepage {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"moepage {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
