"""`moepage split SRC OUT`"""
from __future__ import annotations

import sys


def register(sub):
    p = sub.add_parser("split", help="split a checkpoint into resident weights + one shard per routed expert")
    p.add_argument("src", help="HF safetensors model directory (or a .gguf file)")
    p.add_argument("out", help="output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    if str(args.src).endswith(".gguf"):
        from moepage.surgery.split_gguf import split_gguf

        manifest = split_gguf(args.src, args.out, log=lambda s: print(s, file=sys.stderr))
    else:
        from moepage.surgery.split import split_checkpoint

        manifest = split_checkpoint(args.src, args.out, log=lambda s: print(s, file=sys.stderr))
    total = sum(m["size"] for m in manifest["files"].values())
    print(f"wrote {len(manifest['files'])} files, {total / 2**20:.1f} MiB, to {args.out}")
    return 0
