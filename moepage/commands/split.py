"""`moepage split SRC OUT`"""
from __future__ import annotations

import sys


def register(sub):
    p = sub.add_parser("split", help="split a checkpoint into resident weights + one shard per routed expert")
    p.add_argument("src", help="HF safetensors model directory (or a .gguf file)")
    p.add_argument("out", help="output directory")
    p.add_argument("--lossless", action="store_true",
                   help="store bf16 experts in moepage's lossless 12-bit encoding: a quarter fewer bytes to read per "
                        "page-in, bit-identical weights (safetensors sources only)")
    p.set_defaults(func=run)


def run(args) -> int:
    if str(args.src).endswith(".gguf"):
        if args.lossless:
            print("split: --lossless applies to bf16 safetensors experts, not GGUF", file=sys.stderr)
            return 2
        from moepage.surgery.split_gguf import split_gguf

        manifest = split_gguf(args.src, args.out, log=lambda s: print(s, file=sys.stderr))
    else:
        from moepage.surgery.split import split_checkpoint

        manifest = split_checkpoint(args.src, args.out, log=lambda s: print(s, file=sys.stderr), lossless=args.lossless)
    total = sum(m["size"] for m in manifest["files"].values())
    print(f"wrote {len(manifest['files'])} files, {total / 2**20:.1f} MiB, to {args.out}")
    return 0
