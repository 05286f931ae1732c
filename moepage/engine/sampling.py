"""Sampling parameters and the sampler (penalties, temperature, top-k, top-p, min-p, seeded RNG), and the stop-string
matcher.

Shape legend: V vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moepage.kernels.ggml_cpu import finite_argmax


class NonFiniteLogits(RuntimeError):
    """The model's logits hold NaN or inf: a weight file is most likely corrupt or changed since it was written."""


@dataclass
class SamplingParams:
    max_tokens: int | None = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N: chosen token plus N alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)

    def validate(self, vocab_size: int | None = None):
        def bad(name, why):
            raise ValueError(f"{name} {why}")

        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v):
                bad(name, f"must be a finite number, got {v}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.top_k < -1:
            bad("top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", f"must be between 0 and 20, got {self.logprobs}")
        if vocab_size is not None:
            for t in list(self.stop_token_ids) + list(self.logit_bias):
                if not 0 <= int(t) < vocab_size:
                    bad("token id", f"{t} is outside the vocabulary (0..{vocab_size - 1})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class TokenChoice:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class Sampler:
    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device="cpu"):
        self.p = params
        self.device = device
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(int(params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        else:
            self.generator.seed()
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt_ids:
            self.seen[torch.tensor([i for i in prompt_ids if 0 <= i < vocab_size], dtype=torch.long)] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)  # generated tokens only
        self.generated = 0
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            for t, b in params.logit_bias.items():
                self.bias[int(t)] = float(b)

    def _adjust(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.p
        if self.bias is not None:
            logits = logits + self.bias
        if p.repetition_penalty != 1.0:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if p.presence_penalty or p.frequency_penalty:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        return logits

    def __call__(self, raw: torch.Tensor) -> TokenChoice:
        """raw [V] logits -> the next token (and its logprobs from the model's own distribution)."""
        p = self.p
        plain = self.bias is None and p.repetition_penalty == 1.0 and not (p.presence_penalty or p.frequency_penalty)
        # greedy: one C++ pass checks and picks (kernels/ggml_cpu.py; -1: a NaN or inf), else torch's ops
        fast = finite_argmax(raw) if p.greedy and plain else None
        if fast == -1 or (fast is None and not bool(torch.isfinite(raw).all())):
            raise NonFiniteLogits(f"the model produced non-finite logits (NaN or inf) at output token "
                                  f"{self.generated + 1}: a weight file may be corrupt or changed; see `moepage verify`")
        if fast is not None:
            token = fast
        elif p.greedy and plain:
            token = int(torch.argmax(raw))  # widening to float32 is exact and keeps the order (and the first of ties)
        else:
            raw = raw.float()
            logits = self._adjust(raw)
            if p.greedy:
                token = int(torch.argmax(logits))
            else:
                logits = logits / p.temperature
                if p.top_k > 0 and p.top_k < logits.shape[-1]:
                    kth = torch.topk(logits, p.top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                if p.min_p > 0:
                    probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
                if p.top_p < 1.0:
                    sorted_p, order = torch.sort(probs, descending=True)
                    cum = torch.cumsum(sorted_p, dim=-1)
                    drop = cum - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
                    sorted_p = sorted_p.masked_fill(drop, 0.0)
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
                token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.generated += 1
        self.seen[token] = True
        self.counts[token] += 1
        choice = TokenChoice(token)
        if p.logprobs is not None:
            lp = torch.log_softmax(raw.float(), dim=-1)
            choice.logprob = float(lp[token])
            if p.logprobs > 0:
                vals, ids = torch.topk(lp, p.logprobs)
                choice.top = list(zip(ids.tolist(), vals.tolist()))
        return choice


class StopMatcher:
    """Finds stop strings in text that arrives in pieces, looking at each new character once (an Aho-Corasick
    automaton): `pending` is the tail held back because it may still begin a stop string."""

    def __init__(self, stops: list[str]):
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]  # length of the prefix a state stands for
        self.fail = [0]
        self.longest = [0]  # length of the longest stop string ending at this state (0: none)
        for s in stops:
            self._add(s)
        self._link()
        self.state = 0
        self.pending = ""

    def _add(self, stop: str):
        node = 0
        for ch in stop:
            nxt = self.goto[node].get(ch)
            if nxt is None:
                nxt = len(self.goto)
                self.goto[node][ch] = nxt
                self.goto.append({})
                self.depth.append(self.depth[node] + 1)
                self.fail.append(0)
                self.longest.append(0)
            node = nxt
        self.longest[node] = max(self.longest[node], len(stop))

    def _link(self):
        order = list(self.goto[0].values())
        for node in order:
            for ch, child in self.goto[node].items():
                f = self.fail[node]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[child] = self.goto[f].get(ch, 0)
                self.longest[child] = max(self.longest[child], self.longest[self.fail[child]])
                order.append(child)

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found); after a find, the text up to the earliest-starting
        stop string in what was held back plus `text`."""
        if len(self.goto) == 1:  # no stop strings
            return text, False
        state, base, earliest = self.state, len(self.pending), None
        for i, ch in enumerate(text):
            while state and ch not in self.goto[state]:
                state = self.fail[state]
            state = self.goto[state].get(ch, 0)
            if self.longest[state]:
                start = base + i + 1 - self.longest[state]
                earliest = start if earliest is None else min(earliest, start)
        buf = self.pending + text
        if earliest is not None:
            self.state, self.pending = 0, ""
            return buf[:earliest], True
        keep = self.depth[state]
        self.state = state
        emit, self.pending = (buf[: len(buf) - keep], buf[len(buf) - keep:])
        return emit, False
