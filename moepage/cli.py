"""`moepage serve | generate | inspect | split | verify | ...`"""
from __future__ import annotations

import argparse
import re
import sys

from moepage.paging.budget import human, parse_size

MODEL_HELP = ("a model directory (Hugging Face safetensors or a `moepage split` output), a .gguf file or a Hugging "
              "Face repo id (owner/repo, owner/repo:Q4_K_M, owner/repo/file.gguf); `demo` or nothing: the built-in "
              "demo model")


class Size(int):
    """A byte count from the command line that remembers how it was written (start-up says how it was read)."""

    text: str

    def __new__(cls, text: str):
        value = super().__new__(cls, parse_size(text))
        value.text = str(text).strip()
        return value

    def describe(self) -> str:
        """'6GB = 6,000,000,000 bytes = 5.6 GiB (GB: powers of 1000; 6GiB or 6G: 6.0 GiB)'."""
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)", self.text)
        number, unit = (m.group(1), m.group(2)) if m else (self.text, "")
        head = f"{self.text} = {int(self):,} bytes = {human(int(self))}"
        if unit.lower() in ("", "b"):
            return head
        letter = unit[0].upper()
        if unit.lower().endswith("b") and unit.lower() != f"{letter.lower()}ib":  # GB, MB: decimal
            other = parse_size(f"{number}{letter}iB")
            return f"{head} ({unit}: powers of 1000; {number}{letter}iB or {number}{letter}: {human(other)})"
        other = parse_size(f"{number}{letter}B")
        return f"{head} ({unit}: powers of 1024; {number}{letter}B: {human(other)})"


def size_argument(text: str) -> Size:
    """argparse type for byte sizes: the error names the accepted forms, not the function."""
    try:
        return Size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_argument(p: argparse.ArgumentParser, name: str = "model", optional: bool = True, help: str | None = None):
    """The positional MODEL every verb that reads a model takes; optional ones default to the demo model."""
    p.add_argument(name, nargs="?" if optional else None, default=None, metavar=name.upper(),
                   help=help or MODEL_HELP)


def model_path(spec: str | None, revision: str | None = None) -> str:
    """MODEL as a local path: the demo model for `demo` or nothing, a Hub id fetched into the local cache."""
    from moepage.server.model_source import resolve_model

    return resolve_model(spec, revision).path


def add_engine_arguments(p: argparse.ArgumentParser):
    p.add_argument("--memory-budget", type=size_argument, default=None,
                   help="bytes for resident weights + KV cache + expert cache: 6GB = 6*10^9, 6GiB or 6G = 6*2^30, "
                        "512MiB, or a byte count (default: unlimited)")
    p.add_argument("--expert-cache", type=size_argument, default=None,
                   help="bytes for the expert cache alone (overrides the share --memory-budget leaves)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (checkpoint's), float32, bfloat16, float16")
    p.add_argument("--ctx-size", type=int, default=None, help="KV cache length in tokens (default min(model max, 4096))")
    p.add_argument("--policy", default="auto",
                   help="expert cache eviction policy: lru | lfu | stale | auto (stale when the cache holds fewer experts "
                        "than one token uses, else lru)")
    p.add_argument("--io-threads", type=int, default=4, help="threads reading experts from disk")
    p.add_argument("--no-prefetch", action="store_true", help="read experts only when a layer needs them")
    p.add_argument("--pregate", action="store_true",
                   help="during decode, read the experts the next layer's router picks for the current hidden state "
                        "(pre-gating; measured slower on the bench model, see docs/performance.md)")
    p.add_argument("--secretary", default=None, metavar="PROFILE",
                   help="a `moepage profile` JSON: guess each prompt's domain and prefetch its hottest experts")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="record every expert access (JSON lines) for `moepage bench --replay`")
    p.add_argument("--threads", type=int, default=None, help="torch compute threads")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of split shards at first page-in")
    p.add_argument("--lora", default=None, metavar="ADAPTER",
                   help="a PEFT LoRA adapter directory (`moepage train --lora`): merged into the resident weights at "
                        "load and into each routed expert as it is paged in")


def size_lines(args) -> list[str]:
    """How each size flag given was read, for start-up (6GB and 6G differ by 7%)."""
    out = []
    for flag in ("memory_budget", "expert_cache"):
        value = getattr(args, flag, None)
        if isinstance(value, Size):
            out.append(f"--{flag.replace('_', '-')} {value.describe()}")
    return out


def engine_config(args, model: str):
    from moepage.engine.engine import EngineConfig

    for line in size_lines(args):
        print(line, file=sys.stderr)
    return EngineConfig(
        model=model, memory_budget=args.memory_budget, expert_cache_bytes=args.expert_cache, dtype=args.dtype,
        ctx_size=args.ctx_size, policy=args.policy, io_threads=args.io_threads, prefetch=not args.no_prefetch,
        threads=args.threads, device=args.device, verify_shards=not args.no_verify,
        pregate=args.pregate, trace=args.trace, secretary=args.secretary, lora=args.lora,
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
