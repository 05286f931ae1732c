"""`moepage upcycle DENSE OUT --experts N --shared 1 --top-k K --drop 0.3`: a dense Qwen2/Qwen3 model -> an MoE."""
from __future__ import annotations

from moepage.commands import plural


def register(sub):
    p = sub.add_parser("upcycle", help="turn a dense Qwen2/Qwen3 checkpoint into a Qwen2-MoE/Qwen3-MoE checkpoint")
    p.add_argument("dense", help="dense checkpoint directory (Qwen2 or Qwen3, HF safetensors)")
    p.add_argument("out", help="output directory for the MoE checkpoint")
    p.add_argument("--experts", type=int, default=4, help="routed experts per layer (copies of the dense FFN)")
    p.add_argument("--shared", type=int, default=None, choices=[0, 1],
                   help="shared experts, 0 or 1 (default: 1 for a Qwen2 model, which becomes Qwen2-MoE; 0 for Qwen3, "
                        "which becomes Qwen3-MoE)")
    p.add_argument("--top-k", type=int, default=2, help="routed experts per token")
    p.add_argument("--drop", type=float, default=0.0,
                   help="Drop-Upcycling: fraction of each copy's FFN neurons re-initialised (0 = exact copy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router and the re-drawn neurons (default 0)")
    p.add_argument("--dtype", default=None, help="output dtype (default: the dense checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from moepage.surgery.checkpoint_writer import prepare_output_dir
    from moepage.surgery.trainable_model import read_checkpoint
    from moepage.surgery.upcycle import UpcycleConfig, upcycle

    config, _ = read_checkpoint(args.dense)
    shared = args.shared if args.shared is not None else (1 if config.get("model_type") == "qwen2" else 0)
    cfg = UpcycleConfig(experts=args.experts, shared=shared, top_k=args.top_k, drop=args.drop, seed=args.seed)
    cfg.validate(config.get("model_type"))
    out = prepare_output_dir(args.out, overwrite=args.overwrite)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    r = upcycle(args.dense, out, cfg, dtype=dtype)
    print(f"wrote {r['model_type']} to {r['out']}: {plural(r['experts'], 'routed expert')} per layer, "
          f"top-{r['top_k']}, {plural(r['shared'], 'shared expert')}, drop {r['drop']:g}; {r['params_dense'] / 1e6:.2f} M parameters "
          f"dense -> {r['params_moe'] / 1e6:.2f} M")
    return 0
