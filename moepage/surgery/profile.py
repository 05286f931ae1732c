"""`moepage profile`: run calibration text per domain through the model and record routing statistics.

Routing is observed through SparseMoE.observers (router weights, chosen experts) and the expert outputs
through SparseMoE.output_observers (for the REAP saliency: routing weight x output norm). Files are read one at a
time and only until the domain's token cap is reached, so a large file set costs what the cap needs.

Shape legend: T tokens, E experts, K experts per token, t tokens routed to one expert, H hidden, L MoE layers.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moepage.paging.secretary import NGRAM_BUCKETS, ngram_table
from moepage.surgery.profile_format import FORMAT, VERSION, specialization


CHARS_PER_TOKEN_BOUND = 32  # a file is read up to this many characters per token still wanted (BPE tokens are shorter)


@dataclass
class TextSource:
    path: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def read(self, max_chars: int | None = None) -> "TextSource":
        return self


@dataclass
class TextFile:
    """A calibration file not read yet: profile_engine reads it only if the domain still wants tokens."""

    path: str

    def read(self, max_chars: int | None = None) -> TextSource:
        """Its text (gunzipped for .gz), at most max_chars characters."""
        opener = gzip.open if self.path.endswith(".gz") else open  # /usr/share/doc style README.gz: text, not bytes
        with opener(self.path, "rt", encoding="utf-8", errors="replace") as f:
            return TextSource(self.path, f.read(-1 if max_chars is None else max_chars))


def parse_domain_args(specs: list[list[str]]) -> dict[str, list[str]]:
    """argparse `--domain NAME=FILE [FILE ...]` (repeatable) -> {name: [file patterns]}."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        first, *rest = spec
        if "=" not in first or not first.split("=", 1)[0]:
            raise ValueError(f"--domain expects NAME=FILE [FILE ...], got {' '.join(spec)!r}")
        name, head = first.split("=", 1)
        out.setdefault(name, []).extend(p for p in [head, *rest] if p)
    if not out:
        raise ValueError("give at least one --domain NAME=FILE")
    return out


def list_sources(patterns: list[str], domain_name: str) -> list[TextFile]:
    """Files, directories (every file below, sorted) and glob patterns (`**` recursive) -> files, in a stable
    order; nothing is read yet."""
    paths: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(pattern) for f in fs)
        else:
            found = [pattern]
            if any(c in pattern for c in "*?["):
                found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found or not all(os.path.isfile(p) for p in found):
            missing = next((p for p in found if not os.path.isfile(p)), pattern)
            raise FileNotFoundError(f"domain {domain_name!r}: no such text file {missing!r}")
        paths += found
    return [TextFile(p) for p in paths]


def read_sources(patterns: list[str], domain_name: str) -> list[TextSource]:
    """list_sources, every file read whole."""
    sources = [f.read() for f in list_sources(patterns, domain_name)]
    if not any(s.text.strip() for s in sources):
        raise ValueError(f"domain {domain_name!r}: its files contain no text")
    return sources


class RoutingRecorder:
    """Accumulates per (MoE layer, expert) statistics from the engine's observer hooks for one domain at a time."""

    def __init__(self, moe_layers: list[int], num_experts: int, shared_gates: dict[int, torch.Tensor]):
        self.row = {layer: i for i, layer in enumerate(moe_layers)}
        self.num_experts = num_experts
        self.shared_gates = shared_gates  # layer -> [1, H] sigmoid gate of the shared expert
        self.reset()

    def reset(self):
        L, E = len(self.row), self.num_experts
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.count, self.mass, self.norm_sum, self.saliency_sum = z(L, E), z(L, E), z(L, E), z(L, E)
        self.shared_gate_sum, self.shared_gate_rows = z(L), z(L)

    def on_route(self, layer: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        """logits [T, E], weights [T, K], indices [T, K]."""
        r = self.row[layer]
        flat = indices.reshape(-1)
        self.count[r] += torch.bincount(flat, minlength=self.num_experts).double()
        self.mass[r].index_add_(0, flat, weights.reshape(-1).double())

    def on_output(self, layer: int, expert: int, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor):
        """x [t, H] routed to `expert`, weights [t], out [t, H] its unweighted output."""
        r = self.row[layer]
        norms = out.double().norm(dim=-1)  # [t]
        self.norm_sum[r, expert] += norms.sum()
        self.saliency_sum[r, expert] += (weights.double() * norms).sum()
        gate = self.shared_gates.get(layer)
        if gate is not None:
            # Every token reaches exactly K experts, so the mean over these rows is the mean over tokens.
            self.shared_gate_sum[r] += torch.sigmoid(F.linear(x.double(), gate.double())).sum()
            self.shared_gate_rows[r] += x.shape[0]

    def summary(self, tokens: int) -> dict:
        per_routed = lambda s: torch.where(self.count > 0, s / self.count.clamp(min=1), 0.0)  # noqa: E731
        shared = None
        if self.shared_gates:
            shared = (self.shared_gate_sum / self.shared_gate_rows.clamp(min=1)).tolist()
        return {
            "tokens": tokens,
            "count": self.count.long().tolist(),
            "mass": self.mass.tolist(),
            "mean_norm": per_routed(self.norm_sum).tolist(),
            "saliency": per_routed(self.saliency_sum).tolist(),
            "avg_gate": (self.mass / max(tokens, 1)).tolist(),
            "shared_gate": shared,
        }


def _windows(ids: list[int], max_seq: int, budget: int) -> list[list[int]]:
    out = []
    for s in range(0, len(ids), max_seq):
        if budget <= 0:
            break
        w = ids[s : s + min(max_seq, budget)]
        if len(w) >= 2:
            out.append(w)
            budget -= len(w)
    return out


def profile_engine(engine, domains: dict[str, list[TextSource | TextFile]], max_seq: int = 512,
                   max_tokens_per_domain: int = 65536, model_name: str | None = None) -> dict:
    """Run each domain's texts through `engine` (an Engine) until its token cap and return the profile dict
    (profile_format); `sources` lists the texts used, as far as they were read."""
    from moepage.progress import bar

    if engine.tokenizer is None:
        raise ValueError(f"{engine.ckpt.root}: no tokenizer files next to the model; profiling needs text -> tokens")
    args = engine.args
    max_seq = min(max_seq, engine.ctx_size)
    blocks = engine.model.moe_blocks
    shared_gates = {b.layer: b.shared_gate for b in blocks if b.shared is not None and b.shared_gate is not None}
    rec = RoutingRecorder(args.moe_layers, args.num_experts, shared_gates)
    for b in blocks:
        b.observers.append(rec.on_route)
        b.output_observers.append(rec.on_output)
    result, used = {}, {}
    try:
        for name in sorted(domains):
            rec.reset()
            tokens, predicted, nll = 0, 0, 0.0
            used[name] = []
            with bar(desc=f"profile {name}", total=max_tokens_per_domain, unit="tok", unit_scale=True) as progress:
                for item in domains[name]:
                    wanted = max_tokens_per_domain - tokens
                    if wanted < 2:
                        break
                    src = item.read(wanted * CHARS_PER_TOKEN_BOUND)
                    used[name].append(src)
                    ids = engine.tokenizer.encode(src.text)
                    for window in _windows(ids, max_seq, wanted):
                        logits = engine.logits_all(window).float()  # [T, V]
                        nll += F.cross_entropy(logits[:-1], torch.tensor(window[1:]), reduction="sum").item()
                        tokens += len(window)
                        predicted += len(window) - 1
                        progress.update(len(window))
            if tokens == 0:
                raise ValueError(f"domain {name!r}: its text has fewer than 2 tokens")
            d = rec.summary(tokens)
            d["nll"] = nll / predicted  # mean negative log-likelihood per predicted token
            d["sources"] = [{"path": s.path, "sha256": s.sha256, "chars": len(s.text)} for s in used[name]]
            result[name] = d
    finally:
        for b in blocks:
            b.observers.remove(rec.on_route)
            b.output_observers.remove(rec.on_output)
    names = sorted(result)
    spec = [specialization([result[n]["count"][i] for n in names]) for i in range(len(args.moe_layers))]
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "name": model_name or os.path.basename(os.path.normpath(engine.ckpt.root)),
            "family": args.family,
            "num_experts": args.num_experts,
            "top_k": args.top_k,
            "moe_layers": list(args.moe_layers),
        },
        "settings": {"max_seq": max_seq, "max_tokens_per_domain": max_tokens_per_domain},
        "domains": result,
        "specialization": spec,
        "secretary": {
            "buckets": NGRAM_BUCKETS,
            "ngrams": {n: ngram_table((s.text for s in used[n]), NGRAM_BUCKETS) for n in names},
        },
    }
