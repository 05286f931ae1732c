"""`moepage generate [MODEL] --prompt TEXT`: a quick look, with tokens/s and cache hit rate."""
from __future__ import annotations

import sys
import time

from moepage.cli import add_engine_arguments, add_model_argument, engine_config, model_path
from moepage.commands.elastic_args import add_elastic_arguments, check_elastic_args, install_elastic


def register(sub):
    p = sub.add_parser("generate", help="generate text from a prompt and print speed and cache statistics")
    add_model_argument(p)
    p.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the same as the positional MODEL (kept for scripts that pass it as a flag)")
    p.add_argument("--prompt", default="Hello", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    add_engine_arguments(p)
    add_elastic_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from moepage.engine.engine import Engine
    from moepage.engine.sampling import SamplingParams

    if args.model and args.model_option and args.model != args.model_option:
        raise ValueError(f"two models given: {args.model} and --model {args.model_option}; give one")
    check_elastic_args(args)
    t0 = time.perf_counter()
    engine = Engine.load(engine_config(args, model_path(args.model or args.model_option)))
    print(engine.memory_summary(), file=sys.stderr)
    try:
        print(install_elastic(engine, args)[1], file=sys.stderr)
    except (ValueError, OSError):
        engine.close()
        raise
    print(f"loaded in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    if args.prompt_ids:
        ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    elif args.chat:
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    else:
        ids = engine.tokenizer.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    tokens = []
    for step in engine.generate(ids, params):
        tokens.append(step.token)
        sys.stdout.write(step.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = engine.last_stats
    c = engine.cache.stats.snapshot()
    print(
        f"tokens: {' '.join(map(str, tokens))}\n"
        f"prompt {s.prompt_tokens} tokens in {s.prefill_seconds:.3f}s ({s.prompt_tokens / max(s.prefill_seconds, 1e-9):.1f} tok/s), "
        f"generated {s.completion_tokens} tokens, decode {s.decode_tps:.2f} tok/s\n"
        f"expert cache: hit rate {c['hit_rate']:.1%} ({c['hits']} hits, {c['misses']} misses, {c['evictions']} evictions), "
        f"read {c['bytes_read'] / 2**20:.1f} MiB, page-in p50 {c['page_in_p50_s'] * 1e3:.2f} ms p99 {c['page_in_p99_s'] * 1e3:.2f} ms",
        file=sys.stderr,
    )
    engine.close()
    return 0
