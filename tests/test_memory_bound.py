"""The budget is a promise: peak RSS of `moepage generate` when the experts are 4x the expert budget."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from moepage.engine.families import qwen3_moe
from moepage.engine.weight_names import expert_names, resident_names, to_checkpoint

HIDDEN, FFN, EXPERTS, LAYERS, VOCAB = 512, 512, 64, 4, 512


def write_big_qwen3(out):
    """A Qwen3-MoE checkpoint with 384 MiB of bf16 experts, one shard per layer, written without transformers."""
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 64, "num_experts": EXPERTS, "num_experts_per_tok": 8, "moe_intermediate_size": FFN,
        "intermediate_size": 1024, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "norm_topk_prob": True, "tie_word_embeddings": False, "dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config))
    args = qwen3_moe.model_args(config)
    g = torch.Generator().manual_seed(0)
    shapes = {"embed": (VOCAB, HIDDEN), "lm_head": (VOCAB, HIDDEN), "norm": (HIDDEN,)}
    per_layer = {"attn_norm": (HIDDEN,), "ffn_norm": (HIDDEN,), "q": (512, HIDDEN), "k": (256, HIDDEN),
                 "v": (256, HIDDEN), "o": (HIDDEN, 512), "q_norm": (64,), "k_norm": (64,), "router": (EXPERTS, HIDDEN)}
    weight_map = {}
    resident = {}
    for canonical in resident_names(args):
        shape = shapes.get(canonical) or per_layer[canonical.split(".", 2)[2]]
        t = torch.randn(shape, generator=g) * (0.05 if len(shape) == 2 else 0.0) + (1.0 if len(shape) == 1 else 0.0)
        resident[to_checkpoint(qwen3_moe.NAMES, canonical)] = t.to(torch.bfloat16)
    save_file(resident, str(out / "resident.safetensors"))
    weight_map.update({n: "resident.safetensors" for n in resident})
    for layer in range(LAYERS):
        tensors = {}
        for e in range(EXPERTS):
            names = expert_names(qwen3_moe.EXPERT_NAMES, layer, e)
            tensors[names["gate"]] = (torch.randn(FFN, HIDDEN, generator=g) * 0.05).to(torch.bfloat16)
            tensors[names["up"]] = (torch.randn(FFN, HIDDEN, generator=g) * 0.05).to(torch.bfloat16)
            tensors[names["down"]] = (torch.randn(HIDDEN, FFN, generator=g) * 0.05).to(torch.bfloat16)
        fname = f"experts-{layer}.safetensors"
        save_file(tensors, str(out / fname))
        weight_map.update({n: fname for n in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return 3 * HIDDEN * FFN * 2 * EXPERTS * LAYERS


def peak_rss_of(cmd: list[str]) -> tuple[int, str]:
    """Peak RSS in bytes of a child process (ru_maxrss of the only child waited for by a fresh python)."""
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stdout.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024) + '\\n' + r.stderr[-2000:]); "
        "sys.exit(r.returncode)"
    )
    p = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    first, _, rest = p.stdout.partition("\n")
    return int(first), rest


def test_peak_rss_stays_within_budget_plus_overhead(tmp_path, checkpoints):
    model = tmp_path / "big"
    model.mkdir()
    experts_total = write_big_qwen3(model)
    expert_budget = experts_total // 4
    gen = [sys.executable, "-m", "moepage.cli", "generate", "--prompt-ids", "1,2,3,4,5,6,7,8", "--max-tokens", "8",
           "--ignore-eos", "--ctx-size", "256", "--threads", "2"]
    # The same command on a tiny model: the process overhead (torch, tokenizers, threads) the budget excludes.
    baseline, _ = peak_rss_of(gen + ["--model", str(checkpoints("qwen3_moe", "float32"))])
    resident_and_kv = 3 * 2**20 + 2 * VOCAB * HIDDEN * 2 + 256 * 4 * 2 * 4 * 64 * 2
    budget = resident_and_kv + expert_budget
    peak, log = peak_rss_of(gen + ["--model", str(model), "--memory-budget", str(budget)])
    assert "evictions" in log
    slack = 64 * 2**20
    print(f"\nexperts {experts_total / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB, baseline process "
          f"{baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, over baseline {(peak - baseline) / 2**20:.0f} MiB")
    assert peak - baseline <= budget + slack, (peak, baseline, budget)
    assert peak - baseline < experts_total / 2  # far from holding every expert


ALLOCATOR_PROBE = """
import resource, torch
from moepage.paging.allocator import return_freed_memory
from moepage.paging.pread import ALIGN, aligned_bytes

def heap():
    for line in open('/proc/self/maps'):
        if line.rstrip().endswith('[heap]'):
            a, b = line.split()[0].split('-')
            return int(a, 16), int(b, 16)

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()

assert return_freed_memory()
temporary = torch.empty(512 << 10, dtype=torch.uint8)
lo, hi = heap()
r0 = rss()
slots = [aligned_bytes(512 << 10) for _ in range(192)]  # below the mmap threshold, as a GGUF expert's parts
for s in slots:
    s.fill_(1)
r1 = rss()
print(lo <= temporary.data_ptr() < hi, all(s.data_ptr() % ALIGN == 0 for s in slots),
      any(lo <= s.data_ptr() < hi for s in slots), (r1 - r0) >> 20, end=' ')
del slots, s
print((rss() - r0) >> 20)
"""


def test_temporaries_reuse_the_heap_and_expert_slots_go_back_to_the_os():
    """Under a budget, a prompt's 128 KiB-1 MiB temporaries come from the heap (fresh mappings cost a 512-token prompt
    on the bench model ~1 s of page faults), while expert slots live in mappings of their own: page-aligned for
    O_DIRECT, and returned to the OS when freed whatever malloc keeps."""
    p = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    temp_in_heap, aligned, slot_in_heap, grew, kept = p.stdout.split()
    assert temp_in_heap == "True" and aligned == "True" and slot_in_heap == "False"
    assert int(grew) >= 90 and int(kept) <= 4, p.stdout


# ---- GGUF: the resident part planned from the header, before it is loaded -------------------------------
def _synthetic_gguf(tmp_path) -> str:
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import synthetic_gguf as sg

    out = str(tmp_path / "tiny-q4_k_m.gguf")
    sg.write_gguf(out, sg.SHAPES["tiny"], "Q4_K_M", _vocab(tmp_path), sg.Routing(), seed=2, progress=False)
    return out


def _vocab(tmp_path) -> str:
    import os
    import tarfile

    import pytest

    from gguf_support import CANDIDATES, LLAMA_CPP_VERSION

    for c in CANDIDATES:
        p = os.path.expanduser(c.format(v=LLAMA_CPP_VERSION))
        if os.path.isfile(p) and p.endswith(".tar.gz"):
            with tarfile.open(p) as tar:
                m = next((m for m in tar.getmembers() if m.name.endswith("models/ggml-vocab-qwen2.gguf")), None)
                if m is not None:
                    m.name = "ggml-vocab-qwen2.gguf"
                    tar.extractall(tmp_path, members=[m], filter="data")
                    return str(tmp_path / "ggml-vocab-qwen2.gguf")
    pytest.skip("the llama-cpp-python sdist (with models/ggml-vocab-qwen2.gguf) is not on this machine")


def test_gguf_budget_refused_before_resident_weights_load(tmp_path, monkeypatch):
    """A budget below the minimum is refused from the header alone: no resident tensor is read (the old engine
    loaded them first and overshot the budget by their size), and the error states the minimum, which a budget
    of exactly that size then meets."""
    import re

    import pytest

    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.gguf_checkpoint import GGUFCheckpoint
    from moepage.paging.budget import BudgetError

    path = _synthetic_gguf(tmp_path)
    real = GGUFCheckpoint.resident_tensor
    reads = []

    def counted(self, name, dtype, device):
        reads.append(name)
        return real(self, name, dtype, device)

    monkeypatch.setattr(GGUFCheckpoint, "resident_tensor", counted)
    with pytest.raises(BudgetError) as e:
        Engine.load(EngineConfig(path, memory_budget=20 << 20, ctx_size=256))
    assert reads == []
    minimum = int(re.search(r"\((\d+) bytes\)", str(e.value)).group(1))
    engine = Engine.load(EngineConfig(path, memory_budget=minimum, ctx_size=256))
    try:
        assert reads and engine.plan.min_budget == minimum
    finally:
        engine.close()


def test_inspect_and_engine_agree_on_gguf_bytes(tmp_path, capsys):
    """`moepage inspect` states the engine's bytes per expert (stored GGML blocks, not a bf16 conversion), its
    resident bytes and its minimum budget."""
    import argparse

    from moepage.commands import inspect
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.paging.budget import human

    path = _synthetic_gguf(tmp_path)
    inspect.run(argparse.Namespace(model=path, dtype="auto", ctx_size=256))
    out = capsys.readouterr().out
    engine = Engine.load(EngineConfig(path, memory_budget=1 << 30, ctx_size=256, prefix_cache=False))
    try:
        plan = engine.plan
        assert f"{human(plan.expert_bytes_each)} in memory as stored" in out
        assert f"under a memory budget: {human(plan.resident_bytes)} resident (the embedding table read" in out
        assert f"{human(plan.min_budget):>10}  minimum" in out
    finally:
        engine.close()
