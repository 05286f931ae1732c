"""Training: next-token loss + optional distillation from a teacher's cached top-k logits + a router loss.

Modes:
  lm        next-token loss only (dense pre-training, or an MoE with its router left alone)
  emergent  + Switch-style load balancing: E * sum_e f_e P_e per MoE layer (experts specialise on their own)
  named     + router cross-entropy toward the row's domain: domain i -> routed expert i ("named experts")
Elastic (--elastic, surgery/elastic_train.py): each row is routed under its own serving budget (shared expert only,
k experts, experts dropped), so every budget is trained for. LoRA (surgery/lora.py): the model is a LoraDecoder and
only its factors train; checkpoints then hold the trainable parameters only.
Every batch has B rows of S+1 tokens; row b comes from domain b mod D at a random offset drawn from a generator
seeded by (seed, step), so the data stream is a pure function of the seed and a resumed run sees exactly the
batches an uninterrupted one would. Checkpoints (model + AdamW state + step) go to OUT/train_state.pt.

Shape legend: B rows, S tokens per row, V vocab, E routed experts, K experts per token, k teacher top-k.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from moepage.surgery.corpus import DomainCorpus
from moepage.surgery.elastic import NAMED_EXPERTS_KEY
from moepage.surgery.elastic_train import ElasticTrainConfig, RowBudgetRouting, row_budgets, row_kept
from moepage.surgery.trainable_model import TrainableDecoder

MODES = ("lm", "emergent", "named")
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    mode: str = "lm"
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_coef: float = 0.1  # weight of the router loss (named: cross-entropy; emergent: load balance)
    distill_coef: float = 0.0  # weight of KL(teacher || student) over the teacher's top-k; 0 = off
    distill_topk: int = 16
    distill_temperature: float = 1.0
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    domains: list[str] = field(default_factory=list)  # empty: all of the corpus's domains, in its order
    elastic_budgets: list[int] = field(default_factory=list)  # routed experts per token per row group; [] = exact
    elastic_drop: float = 0.0  # probability an expert is absent from a row (elastic)

    @property
    def elastic(self) -> ElasticTrainConfig:
        return ElasticTrainConfig(tuple(self.elastic_budgets), self.elastic_drop)

    def validate(self):
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("steps", "batch_size", "seq_len", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and warmup_steps >= 0")
        if self.distill_coef < 0 or self.router_coef < 0:
            raise ValueError("loss coefficients must be >= 0")


@dataclass
class Batch:
    ids: torch.Tensor  # [B, S+1]
    domain: torch.Tensor  # [B] domain index of each row


def sample_batch(corpus: DomainCorpus, domains: list[str], cfg: TrainConfig, step: int, split: str = "train") -> Batch:
    """Row b from domain b mod D at an offset drawn from a generator seeded by (seed, step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    rows, labels = [], []
    for b in range(cfg.batch_size):
        d = b % len(domains)
        stream = getattr(corpus, split)[domains[d]]
        if stream.size < cfg.seq_len + 2:
            raise ValueError(f"domain {domains[d]!r} ({split}) has {stream.size} tokens, fewer than --seq-len + 2")
        start = int(torch.randint(0, stream.size - cfg.seq_len - 1, (1,), generator=g))
        rows.append(torch.from_numpy(stream[start : start + cfg.seq_len + 1].astype(np.int64)))
        labels.append(d)
    return Batch(torch.stack(rows), torch.tensor(labels))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---- losses ------------------------------------------------------------------------------------
def load_balance_loss(router_logits: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer balance loss for one layer: logits [BS, E], indices [BS, K] -> scalar (1.0 = balanced)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [BS, E]
    chosen = (F.one_hot(indices.clamp_min(0), num_experts).float() * (indices >= 0)[..., None]).sum(1)  # [BS, E]
    fraction = chosen.mean(0) / indices.shape[1]  # [E]
    return num_experts * (fraction * probs.mean(0)).sum()


def domain_router_loss(router_logits: torch.Tensor, token_domain: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one layer's router toward expert = domain index: logits [BS, E], token_domain [BS]."""
    return F.cross_entropy(router_logits.float(), token_domain)


def distill_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Forward KL(teacher || student) on the teacher's top-k tokens.

    student_logits [B, S, V]; teacher_values/indices [B, S, k]. The teacher distribution is its top-k renormalised;
    the student's log-probabilities are over the full vocabulary (so mass outside the top-k is penalised).
    """
    t = torch.softmax(teacher_values.float() / temperature, dim=-1)  # [B, S, k]
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices.long())
    return (t * (torch.log(t.clamp_min(1e-12)) - s)).sum(-1).mean() * temperature**2


class TeacherCache:
    """Top-k teacher logits per training step, computed once and kept under DIR/step-NNNNNNN.pt."""

    def __init__(self, teacher: TrainableDecoder, directory: str, topk: int):
        self.teacher = teacher.eval()
        self.directory = directory
        self.topk = topk
        os.makedirs(directory, exist_ok=True)

    def get(self, step: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        path = os.path.join(self.directory, f"step-{step:07d}.pt")
        if os.path.exists(path):
            cached = torch.load(path)
            if torch.equal(cached["ids"], ids):
                return cached["values"].float(), cached["indices"].long()
        with torch.no_grad():
            logits = self.teacher(ids).logits  # [B, S, V]
        values, indices = logits.topk(self.topk, dim=-1)
        torch.save({"ids": ids, "values": values.half(), "indices": indices.int()}, path + ".tmp")
        os.replace(path + ".tmp", path)
        return values.half().float(), indices


def elastic_routing(model: TrainableDecoder, batch: Batch, cfg: TrainConfig, step: int) -> RowBudgetRouting | None:
    """Each row's serving budget for this step (None when elastic training is off)."""
    el = cfg.elastic
    if not el.enabled:
        return None
    a = model.args
    el.validate(a.num_experts, bool(a.shared_expert_intermediate_size))
    B, S = batch.ids.shape[0], batch.ids.shape[1] - 1
    budgets = row_budgets(el, a.top_k, B, max(1, int(batch.domain.max()) + 1), step)
    return RowBudgetRouting(model, budgets, row_kept(el, a.num_experts, B, cfg.seed, step), S)


def compute_losses(model: TrainableDecoder, batch: Batch, cfg: TrainConfig,
                   teacher: tuple[torch.Tensor, torch.Tensor] | None = None, step: int = 0) -> dict[str, torch.Tensor]:
    """{'loss': total, 'lm': ..., 'router': ..., 'distill': ..., 'route_acc': ...} for one batch."""
    inputs, targets = batch.ids[:, :-1], batch.ids[:, 1:]  # [B, S]
    override = elastic_routing(model, batch, cfg, step)
    out = model(inputs) if override is None else model(inputs, routing_override=override)
    V = out.logits.shape[-1]
    losses = {"lm": F.cross_entropy(out.logits.reshape(-1, V).float(), targets.reshape(-1))}
    total = losses["lm"]
    args = model.args
    if cfg.mode != "lm" and out.router_logits:
        token_domain = batch.domain[:, None].expand_as(inputs).reshape(-1)  # [BS]
        if cfg.mode == "named":
            if args.num_experts < int(batch.domain.max()) + 1:
                raise ValueError(f"named mode needs at least one routed expert per domain "
                                 f"({int(batch.domain.max()) + 1} domains, {args.num_experts} experts)")
            per_layer = [domain_router_loss(r, token_domain) for r in out.router_logits]
        else:
            per_layer = [load_balance_loss(r, i, args.num_experts)
                         for r, i in zip(out.router_logits, out.routed_indices)]
        losses["router"] = torch.stack(per_layer).mean()
        total = total + cfg.router_coef * losses["router"]
        with torch.no_grad():
            hits = [(r.argmax(-1) == token_domain).float().mean() for r in out.router_logits]
            losses["route_acc"] = torch.stack(hits).mean()
    if teacher is not None and cfg.distill_coef > 0:
        losses["distill"] = distill_loss(out.logits, teacher[0], teacher[1], cfg.distill_temperature)
        total = total + cfg.distill_coef * losses["distill"]
    losses["loss"] = total
    return losses


# ---- the loop ----------------------------------------------------------------------------------
def make_optimizer(model: TrainableDecoder, cfg: TrainConfig) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]  # a LoraDecoder: its factors only
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def save_state(path: str, model: TrainableDecoder, optimizer, step: int, cfg: TrainConfig):
    tmp = path + ".tmp"
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"model": trainable, "optimizer": optimizer.state_dict(), "step": step,
                "config": asdict(cfg), "model_config": model.config}, tmp)
    os.replace(tmp, path)


def load_state(path: str, model: TrainableDecoder, optimizer, cfg: TrainConfig) -> int:
    state = torch.load(path, weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k not in ("steps", "save_every", "log_every")}
    now = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "save_every", "log_every")}
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise ValueError(f"{path}: cannot resume, the training options differ from the saved run ({', '.join(diff)})")
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state["model"]) != want:
        raise ValueError(f"{path}: cannot resume, it holds other parameters than this model trains")
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


class Progress:
    """One status line: step, losses, routing accuracy, lr, tokens/s, elapsed and ETA."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.first_step: int | None = None  # where this session started (a resumed run starts past 0)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def show(self, step: int, metrics: dict, lr: float, tokens_per_s: float, elapsed: float):
        done = step - (self.first_step or 0)
        eta = (self.total - step) * elapsed / max(1, done)
        parts = [f"step {step}/{self.total}", f"loss {metrics['loss']:.4f}"]
        parts += [f"{k} {metrics[k]:.4f}" for k in ("lm", "router", "distill", "route_acc") if k in metrics]
        parts += [f"lr {lr:.2e}", f"{tokens_per_s:,.0f} tok/s", f"{elapsed:.0f}s elapsed", f"eta {eta:.0f}s"]
        line = " | ".join(parts)
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def done(self):
        if self.tty:
            self.stream.write("\n")


def train(model: TrainableDecoder, corpus: DomainCorpus, cfg: TrainConfig, out_dir: str, resume: bool = True,
          teacher: TrainableDecoder | None = None, stop_after: int | None = None,
          progress: Progress | None = None, on_log: Callable[[dict], None] | None = None) -> dict:
    """Train in place; checkpoints to out_dir/train_state.pt. stop_after ends early (tests of resume).

    Returns the last logged metrics plus 'step', 'tokens', 'seconds'.
    """
    cfg.validate()
    if cfg.elastic.enabled:
        cfg.elastic.validate(model.args.num_experts, bool(model.args.shared_expert_intermediate_size))
    domains = cfg.domains or list(corpus.domains)
    unknown = [d for d in domains if d not in corpus.domains]
    if unknown:
        raise ValueError(f"domains {unknown} are not in the corpus (it has {corpus.domains})")
    os.makedirs(out_dir, exist_ok=True)
    if cfg.mode == "named":  # serving's --restrict-to-domain reads this map from config.json
        model.config[NAMED_EXPERTS_KEY] = {d: i for i, d in enumerate(domains)}
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    state_path = os.path.join(out_dir, STATE_FILE)
    step = load_state(state_path, model, optimizer, cfg) if resume and os.path.exists(state_path) else 0
    teacher_cache = None
    if teacher is not None and cfg.distill_coef > 0:
        teacher_cache = TeacherCache(teacher, os.path.join(out_dir, "teacher_topk"), cfg.distill_topk)
    progress = progress or Progress(cfg.steps)
    progress.first_step = step
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    model.train()
    metrics: dict = {}
    t0, tokens, window_tokens, window_t0 = time.perf_counter(), 0, 0, time.perf_counter()
    while step < end:
        batch = sample_batch(corpus, domains, cfg, step)
        teacher_topk = teacher_cache.get(step, batch.ids[:, :-1]) if teacher_cache else None
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = compute_losses(model, batch, cfg, teacher_topk, step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        step += 1
        n = batch.ids[:, :-1].numel()
        tokens, window_tokens = tokens + n, window_tokens + n
        if step % cfg.log_every == 0 or step == end:
            now = time.perf_counter()
            metrics = {k: float(v.detach()) for k, v in losses.items()}
            tps = window_tokens / max(1e-9, now - window_t0)
            progress.show(step, metrics, lr, tps, now - t0)
            record = {"step": step, "lr": lr, "tokens_per_s": round(tps, 1),
                      **{k: round(v, 5) for k, v in metrics.items()}}
            with open(os.path.join(out_dir, LOG_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")
            if on_log:
                on_log(record)
            window_tokens, window_t0 = 0, now
        if step % cfg.save_every == 0 or step == end:
            save_state(state_path, model, optimizer, step, cfg)
    progress.done()
    return {**metrics, "step": step, "tokens": tokens, "seconds": time.perf_counter() - t0}
