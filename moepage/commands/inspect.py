"""`moepage inspect [MODEL]`: architecture, sizes, bytes per expert and which budget fits what."""
from __future__ import annotations

import torch

from moepage.cli import add_model_argument, model_path


def register(sub):
    p = sub.add_parser("inspect", help="print architecture, sizes and memory budgets for a model")
    add_model_argument(p)
    p.add_argument("--dtype", default="auto",
                   help="compute dtype the sizes are for: auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--ctx-size", type=int, default=None,
                   help="KV cache length in tokens the budgets include (default min(model max, 4096))")
    p.set_defaults(func=run)


def run(args) -> int:
    from moepage.engine.checkpoint import open_checkpoint
    from moepage.engine.engine import EngineConfig, packable_lm_head, read_buffer_bytes, resolve_dtype
    from moepage.engine.memory_plan import planned_resident_bytes, prefill_workspace_bytes
    from moepage.engine.quantized_expert import expert_loader
    from moepage.engine.sequence_state import sequence_nbytes
    from moepage.commands import plural
    from moepage.paging.budget import human
    from moepage.paging.fp8_experts import FP8_SOURCES

    path = model_path(args.model)
    if config_only(path):
        return run_config_only(path, args.ctx_size)
    ckpt = open_checkpoint(path)
    a = ckpt.args
    dtype = resolve_dtype(args.dtype, a.torch_dtype)
    resident_stored = sum(ckpt.tensor_nbytes(n) for n in ckpt.resident_checkpoint_names().values())
    names = ckpt.resident_checkpoint_names()
    cpu = torch.device("cpu")
    resident = planned_resident_bytes(ckpt, names, dtype, False, False)
    # under a memory budget the engine reads an untied embedding table from disk, and where the fused kernel runs
    # holds a bf16 lm_head in the 12-bit form: the same bytes the engine plans with (engine/memory_plan.py)
    how = []
    on_disk = not a.tie_word_embeddings and "embed" in names and ckpt.tensor_rows(names["embed"], dtype, "cpu")
    if on_disk:
        how.append("the embedding table read from disk row by row")
    packed = packable_lm_head(EngineConfig(path), ckpt, names, dtype, cpu) is not None
    if packed:
        how.append("the lm_head in the lossless 12-bit form")
    budgeted = planned_resident_bytes(ckpt, names, dtype, bool(on_disk), packed)
    buffers = read_buffer_bytes(ckpt, EngineConfig(path).io_threads)
    if buffers:
        budgeted += buffers
        how.append(f"{human(buffers)} of read buffers for the page-in threads")
    ctx = args.ctx_size or min(a.max_position_embeddings, 4096)
    chunk = min(EngineConfig(path).prefill_chunk, ctx)
    workspace = prefill_workspace_bytes(a, chunk, ctx, dtype)  # what the engine keeps out of the expert cache
    n_experts = len(a.moe_layers) * a.num_experts
    _, _, each = expert_loader(ckpt.experts, a, dtype, cpu)  # what the engine's cache holds per expert
    held = "as stored (GGML blocks)" if getattr(ckpt.experts, "quantized", False) else \
        "as stored (FP8 + block scales)" if isinstance(ckpt.experts, FP8_SOURCES) else \
        f"as {str(dtype).replace('torch.', '')}"
    stored_each = max((ckpt.experts.stored_nbytes(layer) for layer in a.moe_layers), default=0)
    kv = sequence_nbytes(a, ctx, dtype)  # as the engine's plan counts a slot
    print(f"model: {ckpt.root} ({ckpt.kind}, {a.family})")
    print(f"layers {a.num_layers} ({len(a.moe_layers)} MoE), hidden {a.hidden_size}, heads {a.num_heads}/{a.num_kv_heads} "
          f"x {a.head_dim}, vocab {a.vocab_size}, max positions {a.max_position_embeddings}")
    print(f"experts: {a.num_experts} per layer, top-{a.top_k}, FFN {a.moe_intermediate_size}"
          + (f", shared expert FFN {a.shared_expert_intermediate_size}" if a.shared_expert_intermediate_size else ""))
    print(f"bytes per expert: {human(stored_each)} on disk, {human(each)} in memory {held} (the largest layer's)")
    print(f"resident weights: {human(resident_stored)} on disk, {human(resident)} in memory; "
          f"all experts: {human(each * n_experts)}; KV cache for {ctx} tokens: {human(kv)}")
    if "linear_attention" in a.mixers or "mla" in a.mixers:
        print(state_line(a, dtype))
    if how:
        print(f"under a memory budget: {human(budgeted)} resident ({', '.join(how)})")
    print(f"prefill workspace: {human(workspace)} (a {chunk}-token chunk's temporaries, in the budgets below)")
    print("memory budget -> experts resident:")
    for frac in (1.0, 0.75, 0.5, 0.3, 0.1):
        print(f"  {human(budgeted + workspace + kv + frac * each * n_experts):>10}  {frac:>4.0%}")
    minimum = budgeted + workspace + kv + a.top_k * each
    print(f"  {human(minimum):>10}  minimum ({plural(a.top_k, 'expert')}: one token's "
          "experts of one layer)")
    return 0


def config_only(path: str) -> bool:
    """A directory holding a config.json and no weights (a published config written out by hand)."""
    import glob
    import os

    from moepage.engine.checkpoint import INDEX, MANIFEST

    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and not glob.glob(os.path.join(path, "*.safetensors"))
            and not any(os.path.lexists(os.path.join(path, n)) for n in (INDEX, MANIFEST)))


def state_line(a, dtype) -> str:
    from moepage.commands.inspect_sizes import kv_nbytes_per_1k, recurrent_state_nbytes
    from moepage.paging.budget import human

    if "mla" in a.mixers:
        from moepage.engine.attention.mla import MLAShape

        latent = MLAShape(**a.mla).latent_dim
        return (f"per sequence: latent KV {human(kv_nbytes_per_1k(a, dtype))} per 1k tokens ({a.mixers.count('mla')} "
                f"MLA layers x {latent} values a token: the compressed latent and the rope key, not per-head K/V)")
    return (f"per sequence: recurrent state {human(recurrent_state_nbytes(a, dtype))} "
            f"({a.mixers.count('linear_attention')} linear-attention layers, any length; held twice: the live state "
            f"and its copy at the newest chunk end) + KV "
            f"{human(kv_nbytes_per_1k(a, dtype))} per 1k tokens ({a.mixers.count('full_attention')} attention layers)")


def run_config_only(path: str, ctx: int | None) -> int:
    """Sizes and the budget table from config.json alone."""
    import os

    from moepage.commands.inspect_sizes import budget_table, config_sizes
    from moepage.engine.checkpoint import model_args_of
    from moepage.paging.budget import human
    from moepage.paging.model_paths import read_model_json

    config = read_model_json(path, "config.json", "config.json")
    _, a = model_args_of(config, os.path.join(path, "config.json"))
    s = config_sizes(a)
    ctx = ctx or min(a.max_position_embeddings, 4096)
    print(f"model: {path} (config only, {a.family}): no weights here; sizes from config.json")
    print(f"parameters: {s.total_params / 1e9:.2f} B total, {s.active_params / 1e9:.2f} B active per token "
          f"({s.resident_params / 1e9:.2f} B resident, {s.experts} routed experts of {s.expert_params / 1e6:.2f} M)")
    print(f"layers {a.num_layers} ({len(a.moe_layers)} MoE), hidden {a.hidden_size}, vocab {a.vocab_size}; "
          f"experts: {a.num_experts} per layer, top-{a.top_k}, FFN {a.moe_intermediate_size}")
    print(f"bytes per expert: {human(s.expert_bf16)} bf16, {human(s.expert_q4km)} Q4_K_M; "
          f"resident weights: {human(s.resident_bf16)} bf16, {human(s.resident_q4km)} Q4_K_M")
    print(state_line(a, torch.bfloat16))
    print("memory budget -> experts resident:")
    for line in budget_table(a, s, ctx):
        print(line)
    return 0
