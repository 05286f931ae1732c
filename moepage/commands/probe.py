"""`moepage probe MODEL --corpus C.npz [--named] [--png P]`: perplexity and routing per domain on held-out text."""
from __future__ import annotations

import json

from moepage.cli import add_model_argument, model_path


def register(sub):
    p = sub.add_parser("probe", help="per-domain perplexity, routing share/separation and (named) routing accuracy")
    add_model_argument(p, help="checkpoint directory: dense Qwen2/Qwen3 or Qwen2-MoE/Qwen3-MoE (`demo` or nothing: "
                               "the built-in demo model)")
    p.add_argument("--corpus", required=True, help="domain corpus .npz (written by `moepage train` or corpus.py)")
    p.add_argument("--named", action="store_true", help="report routing accuracy for domain i -> expert i")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens per domain")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per forward pass (default 256)")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"], help="which part of the corpus to score")
    p.add_argument("--png", default=None, help="write a routing-share heatmap here (needs matplotlib)")
    p.add_argument("--json", default=None, help="write the result JSON here (default: stdout)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moepage.surgery.corpus import DomainCorpus
    from moepage.surgery.probe import ProbeConfig, probe, write_routing_png
    from moepage.surgery.trainable_model import TrainableDecoder

    cfg = ProbeConfig(tokens_per_domain=args.tokens, seq_len=args.seq_len, named=args.named, split=args.split)
    result = probe(TrainableDecoder.from_pretrained(model_path(args.model)), DomainCorpus.load(args.corpus), cfg)
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.png:
        write_routing_png(result, args.png)
    return 0
