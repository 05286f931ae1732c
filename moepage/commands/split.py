"""`moepage split SRC OUT [--lossless]`"""
from __future__ import annotations

import sys

from moepage.cli import add_model_argument, model_path


def register(sub):
    p = sub.add_parser("split", help="split a checkpoint into resident weights + one shard per routed expert")
    add_model_argument(p, "src", optional=False,
                       help="Hugging Face safetensors model directory or .gguf file (or a Hub id; `demo`: the built-in "
                            "demo model)")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--lossless", action="store_true",
                   help="store bf16 experts in moepage's lossless 12-bit encoding: a quarter fewer bytes to read per "
                        "page-in, bit-identical weights (safetensors sources only)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moepage.progress import Progress

    src = model_path(args.src)
    with Progress(f"split {args.out}", unit="expert") as progress:
        if src.endswith(".gguf"):
            if args.lossless:
                raise ValueError(f"{args.src}: --lossless encodes bf16 safetensors experts; a GGUF keeps its own "
                                 f"encoding (split it without --lossless)")
            from moepage.surgery.split_gguf import split_gguf

            manifest = split_gguf(src, args.out, progress=progress)
        else:
            from moepage.surgery.split import split_checkpoint

            manifest = split_checkpoint(src, args.out, log=lambda s: print(s, file=sys.stderr),
                                        lossless=args.lossless, progress=progress)
    total = sum(m.get("size", m.get("bytes", 0)) for m in manifest["files"].values())
    print(f"wrote {len(manifest['files'])} files, {total / 2**20:.1f} MiB, to {args.out}")
    return 0
