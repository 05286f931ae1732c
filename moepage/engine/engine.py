"""Engine: a loaded model, its expert cache, its sequence slots (a KV cache each), and generation: one sequence at a
time here (generate), up to --parallel of them interleaved by the server's scheduler (server/worker.py)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from moepage.engine.checkpoint import Checkpoint, open_checkpoint
from moepage.engine.kv_cache import ContextOverflow
from moepage.engine.lora_merge import LoraMerge
from moepage.engine.model import MoEModel
from moepage.engine.prompt_cache import ChunkSchedule, PromptCache, message_end_ids
from moepage.engine.sequence_state import SequenceState, sequence_nbytes
from moepage.engine.quantized_expert import expert_loader
from moepage.engine.sampling import SamplingParams
from moepage.engine.sequence import Sequence, Slot
from moepage.engine.tokenizer import Tokenizer
from moepage.engine.weight_names import resident_dtype
from moepage.kernels import native
from moepage.kernels.ggml import ggml_backend
from moepage.paging.allocator import return_freed_memory
from moepage.paging.bf16_12bit import ENCODING, PackedMatrix, fused_kernel
from moepage.paging.budget import MemoryPlan, plan_memory
from moepage.engine.memory_plan import planned_resident_bytes, prefill_workspace_bytes
from moepage.paging.trace import TraceRecorder
from moepage.paging.cache import ExpertCache

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class EngineConfig:
    model: str
    memory_budget: int | None = None  # bytes for resident + KV + expert cache; None = unlimited
    expert_cache_bytes: int | None = None  # overrides the expert share of the budget
    dtype: str = "auto"
    ctx_size: int | None = None
    policy: str = "auto"  # lru | lfu | stale | auto (stale below one token's experts, else lru: docs/performance.md)
    io_threads: int = 4  # page-in readers: more reads in flight keep an NVMe queue fuller (docs/performance.md)
    prefetch: bool = True
    device: str = "cpu"
    threads: int | None = None
    prefill_chunk: int = 512
    parallel: int = 1  # sequences that can be generated at once, each with a KV cache of ctx_size (all budgeted)
    verify_shards: bool = True
    drop_page_cache: bool = True
    # Prompt cache: re-use the longest cached prefix of each prompt, to a fixed chunk end (engine/prompt_cache.py).
    prefix_cache: bool = False
    prompt_cache_bytes: int | None = None  # snapshots kept; None: default_prompt_cache_bytes
    # Read the token embedding table row by row from disk instead of holding it (a large vocabulary's table is big).
    # None: do so when a memory budget is set and the embeddings are not tied to the lm_head.
    embed_on_disk: bool | None = None
    # Pre-gating: during decode, read the experts the next layer's router picks for the current hidden state.
    # Off by default: its wrong guesses are reads a disk-bound cap cannot afford (docs/performance.md).
    pregate: bool = False
    trace: str | None = None  # write every expert access to this file (JSON lines) for offline policy replays
    tokenizer: bool = True  # False: token ids in and out only (benchmarks; a large vocabulary's tokenizer is big)
    secretary: str | None = None  # a `moepage profile` JSON: guess each prompt's domain, prefetch its hot experts
    # Read every expert at load when the budget holds them all (a fully resident model starts warm, as llama.cpp's
    # mmap does with a warm page cache). None: do so exactly when every expert fits.
    preload: bool | None = None
    # Hold the lm_head (the largest resident matrix) in the lossless 12-bit form and multiply from it directly: 25%
    # less memory, the same logits bit for bit, a faster decode where memory bandwidth is the limit. None: wherever
    # the fused kernel runs (bf16; any CPU the kernels build for, bar AVX512-BF16 without VBMI2).
    pack_lm_head: bool | None = None
    lora: str | None = None  # a PEFT LoRA adapter directory, merged at load and into each expert paged in


@dataclass
class StepOutput:
    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV was reused (prefix cache)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def decode_tps(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def resolve_dtype(name: str, checkpoint_dtype: str) -> torch.dtype:
    key = checkpoint_dtype if name == "auto" else name
    try:
        return DTYPES[str(key).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unsupported dtype {key!r}; choose from {', '.join(DTYPES)}") from None


class Engine:
    def __init__(self, ckpt: Checkpoint, tokenizer: Tokenizer | None, model: MoEModel, cache: ExpertCache,
                 kv: SequenceState, plan: MemoryPlan, cfg: EngineConfig):
        self.ckpt = ckpt
        self.args = ckpt.args
        self.tokenizer = tokenizer
        self.model = model
        self.cache = cache
        self.kv = kv
        self.plan = plan
        self.cfg = cfg
        self.lock = threading.Lock()
        gen = ckpt.generation_config
        eos = set(self.args.eos_token_ids) | set(_as_list(gen.get("eos_token_id")))
        if tokenizer is not None and tokenizer.eos_id is not None:
            eos.add(tokenizer.eos_id)
        self.eos_ids = eos
        # prefill chunks end after cfg.prefill_chunk tokens or after an end-of-turn token (exact prompt re-use)
        self.chunks = ChunkSchedule(max(1, cfg.prefill_chunk), frozenset(eos) | message_end_ids(tokenizer))
        self.last_stats = GenerationStats()
        # slot 0 holds self.kv; the others get a KV cache of the same size (--parallel), counted in the plan
        self.slots = [Slot(kv)] + [Slot(model.new_kv_cache(kv.max_tokens)) for _ in range(max(1, cfg.parallel) - 1)]
        self.prompt_cache: PromptCache | None = None
        self.secretary = None  # paging.secretary.Secretary when EngineConfig.secretary names a profile

    @classmethod
    def load(cls, cfg: EngineConfig) -> "Engine":
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.memory_budget is not None:
            return_freed_memory()
        ckpt = open_checkpoint(cfg.model, drop_page_cache=cfg.drop_page_cache, verify=cfg.verify_shards)
        args = ckpt.args
        dtype = resolve_dtype(cfg.dtype, args.torch_dtype)
        device = torch.device(cfg.device)
        if device.type == "cpu":  # build (first run only) or load the C++ kernels now, not on the first request
            if dtype == torch.bfloat16:
                native.load("bf16_decode")
            if getattr(ckpt.experts, "quantized", False) or ckpt.kind == "gguf":
                ggml_backend()
        names = ckpt.resident_checkpoint_names()
        embed_rows = None
        on_disk = cfg.embed_on_disk if cfg.embed_on_disk is not None else cfg.memory_budget is not None
        if on_disk and not args.tie_word_embeddings:
            embed_rows = ckpt.tensor_rows(names["embed"], dtype, device)
        head_rows = packable_lm_head(cfg, ckpt, names, dtype, device)
        ctx = int(cfg.ctx_size or min(args.max_position_embeddings, 4096))
        if cfg.parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {cfg.parallel}")
        one_kv = sequence_nbytes(args, ctx, dtype)  # KV + recurrent/sliding states and their newest marked copy
        kv_bytes = one_kv * cfg.parallel
        n_experts = len(args.moe_layers) * args.num_experts
        lora = LoraMerge.open(cfg.lora, ckpt) if cfg.lora else None  # wraps ckpt.experts: merged at page-in
        load_expert, expert_nbytes, each = expert_loader(ckpt.experts, args, dtype, device)
        buffers = read_buffer_bytes(ckpt, cfg.io_threads)
        workspace = prefill_workspace_bytes(args, min(max(1, cfg.prefill_chunk), ctx), ctx, dtype) \
            if cfg.memory_budget is not None else 0  # a prefill chunk's temporaries, out of the expert cache
        if cfg.memory_budget is not None and not cfg.lora:  # the budget checked from the headers, before loading
            planned = planned_resident_bytes(ckpt, names, dtype, embed_rows is not None, head_rows is not None)
            plan_memory(cfg.memory_budget, planned, kv_bytes, each, n_experts, args.top_k, cfg.expert_cache_bytes,
                        buffers, (cfg.prompt_cache_bytes or 0) if cfg.prefix_cache else 0, workspace)
        weights = {c: ckpt.resident_tensor(n, resident_dtype(args, c, dtype), device) for c, n in names.items()
                   if not (c == "embed" and embed_rows is not None) and not (c == "lm_head" and head_rows is not None)}
        if head_rows is not None:  # read a block of rows at a time and keep it in the 12-bit form
            weights["lm_head"] = PackedMatrix((head_rows.rows, head_rows.cols), head_rows.block)
        lora_bytes = lora.merge_resident(weights) if lora else 0  # engine/lora_merge.py
        resident_bytes = lora_bytes + sum(t.nbytes if isinstance(t, PackedMatrix) else t.numel() * t.element_size()
                                          for t in weights.values())
        prompt_cache_bytes = 0
        if cfg.prefix_cache:
            prompt_cache_bytes = cfg.prompt_cache_bytes if cfg.prompt_cache_bytes is not None else \
                default_prompt_cache_bytes(cfg.memory_budget, resident_bytes, kv_bytes, buffers + workspace,
                                           args.top_k * each, one_kv)
        plan = plan_memory(cfg.memory_budget, resident_bytes, kv_bytes, each, n_experts, args.top_k,
                           cfg.expert_cache_bytes, buffers, prompt_cache_bytes, workspace)
        if embed_rows is not None:
            plan.on_disk_bytes = ckpt.tensor_nbytes(names["embed"])
        cache = ExpertCache(
            load=load_expert,
            nbytes_of=expert_nbytes,
            budget_bytes=plan.expert_cache_bytes,
            policy=choose_policy(cfg.policy, plan, len(args.moe_layers) * args.top_k * max(1, cfg.parallel)),
            workers=cfg.io_threads,
        )
        model = MoEModel(args, weights, cache, dtype, device, embed_rows)
        for block in model.moe_blocks:
            block.prefetch = cfg.prefetch
            block.pregate = cfg.pregate and plan.fraction_resident < 1.0
        if cfg.trace:
            cache.on_access.append(TraceRecorder(cfg.trace))
        tokenizer = None
        if cfg.tokenizer:
            try:
                tokenizer = ckpt.load_tokenizer()
            except FileNotFoundError:
                pass
        if cfg.preload if cfg.preload is not None else plan.fraction_resident >= 1.0:
            from moepage.progress import bar

            for layer in bar(args.moe_layers, desc="reading experts", unit="layer"):  # a layer at a time: a bar moves
                cache.prefetch([(layer, e) for e in range(args.num_experts)])
                cache.wait_idle()
            if (warm := getattr(model._decode_kernel, "warm", None)) is not None:  # quantized: huge pages
                warm(model)
        engine = cls(ckpt, tokenizer, model, cache, model.new_kv_cache(ctx), plan, cfg)
        if cfg.prefix_cache:
            engine.prompt_cache = PromptCache(prompt_cache_bytes, engine.chunks)
        if cfg.secretary:
            from moepage.paging.secretary import Secretary

            if tokenizer is None:
                raise ValueError("the secretary reads prompt text: it needs the model's tokenizer")
            engine.secretary = Secretary.from_profile(cfg.secretary)
        return engine

    @property
    def ctx_size(self) -> int:
        return self.kv.max_tokens

    def memory_summary(self) -> str:
        """The plan's summary for start-up; where experts page in from plain bf16 files, how to read fewer bytes."""
        lines = [self.plan.summary()]
        src = self.ckpt.experts
        if (self.plan.fraction_resident < 1.0 and self.args.torch_dtype == "bfloat16"
                and not hasattr(src, "read_quantized")  # GGUF keeps its own encoding, even BF16: no --lossless
                and getattr(src, "encoding", None) != ENCODING
                and native.runs_here("bf16_unpack")):  # without the C++ decoder, decoding costs more than reading
            lines.append(f"hint: experts page in as bf16; `moepage split {self.ckpt.root} OUT --lossless` stores the "
                         "same weights bit for bit in 12 bits: a quarter fewer bytes a page-in (1.8x the decode rate "
                         "at the bench's 30% cap, docs/performance.md)")
        return "\n".join(lines)

    def close(self):
        self.cache.close()
        for cb in self.cache.on_access:
            if isinstance(cb, TraceRecorder):
                cb.close()

    # ---- slots and sequences --------------------------------------------------------------------------------------
    @property
    def kv_ids(self) -> list[int]:
        """The tokens whose keys/values slot 0 (self.kv) holds."""
        return self.slots[0].kv_ids

    @property
    def exact_ids(self) -> list[int]:
        return self.slots[0].exact_ids

    def free_slot(self, ids: list[int]) -> Slot | None:
        """The free slot whose state re-uses most of ids (ties: the least recently used), or None if all are busy."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        pc = self.prompt_cache
        return max(free, key=lambda s: (pc.reusable(s.exact_ids, ids) if pc is not None else 0, -s.last_used))

    def start(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """A Sequence in a free slot (checks as generate does; the caller holds self.lock while it steps it)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        params.validate(self.args.vocab_size)
        if len(prompt_ids) >= self.ctx_size:
            raise ContextOverflow(len(prompt_ids), self.ctx_size)
        slot = self.free_slot(prompt_ids)
        if slot is None:
            raise RuntimeError(f"all {len(self.slots)} sequence slots are busy")
        slot.busy = True
        seq = Sequence(self, slot, prompt_ids, params)
        self.last_stats = seq.stats
        return seq

    # ---- forward passes -----------------------------------------------------------------------
    def prefill(self, ids: list[int], cancelled: Callable[[], bool] | None = None) -> torch.Tensor | None:
        """Run the prompt through the model in chunks in a free slot; logits [V] of the last position (None if
        cancelled)."""
        seq = self.start(ids, SamplingParams())
        try:
            while True:
                if cancelled is not None and cancelled():
                    return None
                if seq.prefill_chunk():
                    return seq.logits
        finally:
            seq.finish()

    def logits_all(self, ids: list[int]) -> torch.Tensor:
        """Logits [T, V] for every position of ids (tests, perplexity)."""
        with self.lock:
            slot = self.slots[0]
            slot.kv.rewind(0)  # recurrent layers too
            slot.kv_ids = list(ids)
            slot.exact_ids = []  # one pass over every position: not the chunks a prefill runs
            return self.model.forward(torch.tensor(ids), slot.kv, start=0, all_logits=True)

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 cancelled: Callable[[], bool] | None = None) -> Iterator[StepOutput]:
        """Prefill then decode, yielding one StepOutput per generated token (text deltas respect stop strings)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        params.validate(self.args.vocab_size)
        if len(prompt_ids) >= self.ctx_size:
            raise ContextOverflow(len(prompt_ids), self.ctx_size)
        with self.lock:
            if self.secretary is not None:
                self.ask_secretary(prompt_ids)
            seq = self.start(prompt_ids, params)
            try:
                yield from self._run(seq, cancelled)
            finally:
                seq.finish()
                if self.secretary is not None:
                    self.secretary.end_request()

    def ask_secretary(self, prompt_ids: list[int]):
        """Prefetch the hottest experts of the prompt's guessed domain (half the expert cache) before prefill."""
        from moepage.paging.secretary import experts_budget_from_bytes

        budget = experts_budget_from_bytes(self.cache.budget, self.plan.expert_bytes_each)
        self.secretary.prefetch(self.cache, self.tokenizer.decode(prompt_ids), budget)

    def _run(self, seq: Sequence, cancelled):
        while True:
            if cancelled is not None and cancelled():
                return
            if seq.prefill_chunk():
                break
        while True:
            out = seq.sample()
            yield out
            if seq.finished or (cancelled is not None and cancelled()):
                return
            seq.feed(self.model.forward(torch.tensor([seq.pending]), seq.slot.kv)[-1])


def packable_lm_head(cfg: EngineConfig, ckpt, names: dict[str, str], dtype: torch.dtype, device):
    """The lm_head's row reader when it is to be held in the lossless 12-bit form (EngineConfig.pack_lm_head;
    None = wherever the fused kernel runs: a bf16 model where paging/bf16_12bit.fused_kernel() builds), else None."""
    want = cfg.pack_lm_head
    if want and ckpt.args.tie_word_embeddings:
        raise ValueError("pack_lm_head: this model's lm_head is its embedding table (tied), which stays bf16")
    if want is False or "lm_head" not in names or ckpt.args.tie_word_embeddings:
        return None
    able = (dtype == torch.bfloat16 and device.type == "cpu" and ckpt.args.hidden_size % 64 == 0
            and fused_kernel() is not None)
    rows = ckpt.tensor_rows(names["lm_head"], dtype, device) if able else None
    if rows is not None and rows.stored_dtype != torch.bfloat16:
        rows = None  # a float32 checkpoint computed in bf16 keeps the plain path (the packed form is of bf16 bits)
    if want and rows is None:
        raise ValueError("pack_lm_head needs a bf16 safetensors lm_head, hidden size a multiple of 64, and the "
                         "12-bit kernel built for this CPU (a C++ compiler; not AVX512-BF16 without VBMI2)")
    return rows


def read_buffer_bytes(ckpt: Checkpoint, io_threads: int) -> int:
    """Bytes of the read buffers kept while paging: one per page-in thread (the cache runs at least one) and one
    for the generating thread's inline reads."""
    each = max((ckpt.experts.staging_nbytes(i) for i in ckpt.args.moe_layers), default=0)
    return (max(1, io_threads) + 1) * each


def choose_policy(name: str, plan: MemoryPlan, experts_per_token: int) -> str:
    """'auto': a cache smaller than one step's experts (experts_per_token: one token's, times --parallel, the rows a
    batched step can hold) is walked cyclically layer by layer, where LRU always evicts what comes next and 'stale'
    keeps a fixed subset; from one step's experts up, LRU wins (replays in docs/performance.md; 4 streams at a 30%
    cap in docs/agent-serving.md)."""
    if name != "auto":
        return name
    capacity = plan.expert_cache_bytes // max(1, plan.expert_bytes_each)
    return "stale" if capacity < experts_per_token else "lru"


def default_prompt_cache_bytes(budget: int | None, resident: int, kv: int, buffers: int, min_experts: int,
                               one_kv: int | None = None) -> int:
    """One full context's state (one_kv; default kv, the slots' KV caches together); under a budget at most half of
    what the experts could have beyond their minimum."""
    one_kv = kv if one_kv is None else one_kv
    if budget is None:
        return one_kv
    return max(0, min(one_kv, (budget - resident - kv - buffers - min_experts) // 2))


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [v] if isinstance(v, int) else list(v)
