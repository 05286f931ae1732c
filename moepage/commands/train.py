"""`moepage train MODEL OUT --mode named|emergent|lm [--teacher T] [--lora ...] [--elastic ...]`: train on local
domain text, resumably; --lora trains PEFT-format adapters (surgery/lora.py), --elastic every serving budget
(surgery/elastic_train.py)."""
from __future__ import annotations

import os

from moepage.cli import add_model_argument, model_path


def register(sub):
    p = sub.add_parser("train", help="train a dense or MoE Qwen model: next-token + distillation + router loss")
    add_model_argument(p, optional=False, help="starting checkpoint: dense Qwen2/Qwen3 or Qwen2-MoE/Qwen3-MoE "
                                                "directory (`demo`: the built-in demo model)")
    p.add_argument("out", help="output directory: train_state.pt (resumable), train_log.jsonl, final checkpoint")
    p.add_argument("--mode", default=None, choices=["lm", "emergent", "named"],
                   help="router loss: named (domain i -> expert i), emergent (load balancing) or lm (none); "
                        "default named, lm with --lora (routers stay frozen)")
    p.add_argument("--corpus", default=None,
                   help="domain corpus .npz; default: build OUT/corpus.npz from this machine's files "
                        "with the model's tokenizer")
    p.add_argument("--domains", default=None,
                   help="comma-separated domains to train on (default: all, in corpus order)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (same tokenizer) for top-k logit distillation")
    p.add_argument("--distill-coef", type=float, default=0.5, help="weight of the distillation loss (with --teacher)")
    p.add_argument("--distill-topk", type=int, default=16, help="teacher logits kept per position (default 16)")
    p.add_argument("--router-coef", type=float, default=0.1, help="weight of the router loss (default 0.1)")
    p.add_argument("--steps", type=int, default=200,
                   help="optimizer steps in all, a resumed run included (default 200)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=10, help="linear LR warmup steps")
    p.add_argument("--seed", type=int, default=0, help="seed of batch sampling and initialisation (default 0)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=10, help="status line and train_log.jsonl record every N steps")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/train_state.pt exists")
    p.add_argument("--threads", type=int, default=None, help="torch compute threads")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the final checkpoint (default float32)")
    g = p.add_argument_group("LoRA (adapters in the PEFT format: OUT/adapter_config.json + adapter_model.safetensors)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters; the model's own weights stay frozen")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, so the scale is 1)")
    g.add_argument("--target", default="q_proj,v_proj,experts",
                   help="comma-separated: q_proj, k_proj, v_proj, o_proj, experts (every routed expert; on a dense "
                        "model the MLP); default q_proj,v_proj,experts")
    g.add_argument("--merge", action="store_true",
                   help="also write the merged model (base + adapter) to OUT/merged")
    g = p.add_argument_group("elastic training (every serving budget trained for)")
    g.add_argument("--elastic", action="store_true",
                   help="route each row under its own budget: shared expert only, 1..top-k experts (--elastic-budgets)")
    g.add_argument("--elastic-budgets", default=None, metavar="K,K,...",
                   help="routed experts per token, one per row group, repeats weight a budget (default: 0..top-k; "
                        "0 = shared expert only)")
    g.add_argument("--elastic-drop", type=float, default=0.0, metavar="P",
                   help="with --elastic, drop each routed expert from a row with probability P (at least one stays)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from moepage.surgery.corpus import CorpusSpec, DomainCorpus, build_corpus
    from moepage.surgery.train import TrainConfig, train
    from moepage.surgery.trainable_model import TrainableDecoder

    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = model_path(args.model)
    model = TrainableDecoder.from_pretrained(args.model)
    budgets = elastic_budgets(args, model)
    if args.lora:
        from moepage.surgery.lora import LoraDecoder, LoraSpec, parse_targets

        model = LoraDecoder(model, LoraSpec(rank=args.rank, alpha=args.alpha, targets=parse_targets(args.target),
                                            seed=args.seed))
    elif args.merge:
        raise ValueError("--merge writes base + adapter: it needs --lora")
    os.makedirs(args.out, exist_ok=True)
    corpus_path = args.corpus or os.path.join(args.out, "corpus.npz")
    if not os.path.exists(corpus_path):
        if args.corpus:
            raise FileNotFoundError(f"{args.corpus}: no such corpus file")
        from tokenizers import Tokenizer

        tok_file = os.path.join(args.model, "tokenizer.json")
        if not os.path.exists(tok_file):
            raise FileNotFoundError(f"{args.model}: no tokenizer.json to build the corpus with (pass --corpus)")
        tok = Tokenizer.from_file(tok_file)
        build_corpus(tok, CorpusSpec(), separator_id=tok.token_to_id("<|endoftext|>")).save(corpus_path)
    corpus = DomainCorpus.load(corpus_path)
    mode = args.mode or ("lm" if args.lora else "named")
    cfg = TrainConfig(mode=mode, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup_steps=args.warmup, router_coef=args.router_coef,
                      distill_coef=args.distill_coef if args.teacher else 0.0, distill_topk=args.distill_topk,
                      seed=args.seed, save_every=args.save_every, log_every=args.log_every,
                      domains=args.domains.split(",") if args.domains else [], elastic_budgets=budgets,
                      elastic_drop=args.elastic_drop if args.elastic else 0.0)
    teacher = TrainableDecoder.from_pretrained(model_path(args.teacher)) if args.teacher else None
    result = train(model, corpus, cfg, args.out, resume=not args.no_resume, teacher=teacher)
    if args.lora:
        from moepage.surgery.lora import lora_card, save_adapter

        save_adapter(model, args.out, base_model=args.model)
        with open(os.path.join(args.out, "README.md"), "w") as f:
            f.write(lora_card(model, args.model, result, merged=False))
        if args.merge:
            merged = os.path.join(args.out, "merged")
            model.save_pretrained(merged, dtype=getattr(torch, args.save_dtype), tokenizer_from=args.model)
            with open(os.path.join(merged, "README.md"), "w") as f:
                f.write(lora_card(model, args.model, result, merged=True))
    else:
        model.save_pretrained(args.out, dtype=getattr(torch, args.save_dtype), tokenizer_from=args.model)
    losses = ", ".join(f"{k} {result[k]:.4f}" for k in ("loss", "lm", "router", "distill", "route_acc") if k in result)
    print(f"wrote {args.out} after {result['step']} steps ({result['tokens']:,} tokens in {result['seconds']:.0f} s)"
          + (f": {losses}" if losses else ""))
    return 0


def elastic_budgets(args, model) -> list[int]:
    """The --elastic budgets ([] without --elastic): the given list, else 0 (when there is a shared expert)..top-k."""
    if not args.elastic:
        if args.elastic_budgets or args.elastic_drop:
            raise ValueError("--elastic-budgets and --elastic-drop need --elastic")
        return []
    a = model.args
    if args.elastic_budgets:
        try:
            return [int(k) for k in args.elastic_budgets.split(",") if k.strip()]
        except ValueError:
            raise ValueError(f"--elastic-budgets {args.elastic_budgets!r}: expected comma-separated integers") from None
    return list(range(0 if a.shared_expert_intermediate_size else 1, a.top_k + 1))
