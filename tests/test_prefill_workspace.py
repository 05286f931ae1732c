"""A prefill chunk's temporaries are planned: every token mixer's measured allocation peak (engine/alloc_peak.py,
the dispatcher's live tensor bytes, not RSS) stays within its TokenMixer.workspace_nbytes, the engine keeps the
largest out of the expert cache and says so, and the Gated DeltaNet chunk rule's temporaries do not grow with the
chunk (one 64-token block at a time).

Shape legend: T tokens, Hk key heads, Hv value heads, D head dim.
"""
from __future__ import annotations

import pytest
import torch

from moepage.engine.alloc_peak import AllocPeak
from moepage.engine.attention import mixer_class
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.memory_plan import prefill_workspace_bytes
from moepage.kernels.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule
from qwen35_support import one_torch_thread, save_qwen35_text  # noqa: F401 (one_torch_thread: autouse)


def measured_peaks(engine, ids: list[int], chunks: list[int]) -> dict[int, int]:
    """Layer index -> the largest allocation peak of its mixer's forward over the prompt's chunks."""
    peaks: dict[int, int] = {}
    for i, layer in enumerate(engine.model.layers):
        def tracked(*args, _f=layer.mixer.forward, _i=i, **kw):
            with AllocPeak() as p:
                out = _f(*args, **kw)
            peaks[_i] = max(peaks.get(_i, 0), p.peak)
            return out
        layer.mixer.forward = tracked
    kv, start = engine.kv, 0
    with torch.inference_mode():
        for n in chunks:
            engine.model.forward(torch.tensor(ids[start:start + n]), kv, start=start)
            start += n
    return peaks


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    return save_qwen35_text(tmp_path_factory.mktemp("hybrid-bf16"), seed=3, dtype=torch.bfloat16)


@pytest.mark.parametrize("model", ["hybrid", "qwen3_moe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planned_workspace_bounds_each_mixers_peak(model, dtype, hybrid, checkpoints):
    path = hybrid if model == "hybrid" else checkpoints("qwen3_moe", "bfloat16")
    ctx, chunks = 320, [150, 130]  # the second chunk attends to the first; 150 = two blocks and a short one
    engine = Engine.load(EngineConfig(str(path), ctx_size=ctx, dtype=dtype, tokenizer=False))
    args = engine.args
    ids = torch.randint(0, args.vocab_size, (sum(chunks),), generator=torch.Generator().manual_seed(0)).tolist()
    peaks = measured_peaks(engine, ids, chunks)
    kinds = set(args.mixers)
    assert kinds == ({"linear_attention", "full_attention"} if model == "hybrid" else {"full_attention"})
    for i, peak in peaks.items():
        kind = args.mixers[i]
        planned = mixer_class(kind).workspace_nbytes(args, max(chunks), ctx, getattr(torch, dtype))
        assert 0 < peak <= planned, (i, kind, peak, planned)
        # a bound, not a blanket (attention's counts float32 norm temporaries a C++ kernel may not make)
        assert planned < (1.5 if kind == "linear_attention" else 5) * peak, (i, kind, peak, planned)
    engine.close()


def test_engine_keeps_the_workspace_out_of_the_expert_cache(hybrid):
    budget = 8 << 20
    engine = Engine.load(EngineConfig(str(hybrid), ctx_size=256, memory_budget=budget, tokenizer=False,
                                      prefix_cache=False))
    plan, args = engine.plan, engine.args
    want = prefill_workspace_bytes(args, min(engine.cfg.prefill_chunk, 256), 256, torch.bfloat16)
    assert plan.workspace_bytes == want > 0
    assert plan.expert_cache_bytes == min(plan.expert_bytes_total, budget - plan.resident_bytes - plan.kv_bytes
                                          - plan.buffer_bytes - want)
    assert "prefill workspace" in engine.memory_summary()
    engine.close()
    unlimited = Engine.load(EngineConfig(str(hybrid), ctx_size=256, tokenizer=False))
    assert unlimited.plan.workspace_bytes == 0
    unlimited.close()


def rule_peak(T: int, dtype=torch.bfloat16) -> int:
    """The chunk rule's allocation peak for T tokens, less its [T, Hv, D] output."""
    Hk, Hv, D = 2, 8, 64
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(T, Hk, D, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(T, Hv, D, generator=g).to(dtype)
    decay, beta = -torch.rand(T, Hv, generator=g), torch.rand(T, Hv, generator=g).to(dtype)
    state = torch.zeros(Hv, D, D)
    with AllocPeak() as p:
        out, _ = chunk_gated_delta_rule(q, k, v, decay, beta, state)
    return p.peak - out.nbytes


def test_chunk_rule_temporaries_do_not_grow_with_the_chunk():
    small, large = rule_peak(128), rule_peak(1024)
    assert large <= small * 1.05, (small, large)  # whole-chunk float32 copies would make it ~8x


def test_chunk_rule_is_deterministic_and_matches_the_recurrent_rule():
    Hk, Hv, D, T = 2, 4, 16, 200
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(T, Hk, D, generator=g) for _ in range(2))
    v, decay, beta = torch.randn(T, Hv, D, generator=g), -torch.rand(T, Hv, generator=g), torch.rand(T, Hv, generator=g)
    state = torch.randn(Hv, D, D, generator=g)
    a = chunk_gated_delta_rule(q, k, v, decay, beta, state)
    b = chunk_gated_delta_rule(q, k, v, decay, beta, state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    out, s = recurrent_gated_delta_rule(q, k, v, decay, beta, state)  # token by token
    torch.testing.assert_close(a[0], out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a[1], s, rtol=1e-4, atol=1e-4)
