"""kernels/busy_threads.py: the decode token's thread count chosen from injected per-token wall times, and the one-call
quantized decode giving the same bytes whichever count each token ran at."""
from __future__ import annotations

import pytest
import torch

from moepage.kernels.busy_threads import BusyThreads, BusyThreadsConfig
from test_quant_decode import decode_logits, q4_k_m  # noqa: F401 (the tiny Q4_K_M GGUF fixture)

CFG = BusyThreadsConfig(probe_first=8, probe_most=8, probe_tokens=2, window=4, margin=0.9)


def drive(b: BusyThreads, seconds: dict[int, float], tokens: int, cores: float | None = None) -> list[int]:
    """The thread count of each of `tokens` tokens, each taking seconds[count] and using `cores` CPU seconds per
    wall second (None: not measured)."""
    out = []
    for _ in range(tokens):
        n = b.next()
        b.record(n, seconds[n], None if cores is None else cores * seconds[n])
        out.append(n)
    return out


def test_an_idle_machine_keeps_every_thread_and_probes_one_rarely():
    b = BusyThreads(2, CFG)
    ran = drive(b, {2: 0.020, 1: 0.032}, 40)
    assert ran[:8] == [2] * 8 and ran[8:10] == [1, 1] and ran[10:18] == [2] * 8 and ran[18:20] == [1, 1]
    assert ran.count(1) == 8 and b.chosen == 2


def test_probes_that_change_nothing_come_ever_more_rarely_and_a_switch_starts_over():
    b = BusyThreads(2, BusyThreadsConfig(probe_first=2, probe_most=8, probe_tokens=1, window=4))
    ran = drive(b, {2: 0.02, 1: 0.03}, 30)
    assert [i for i, n in enumerate(ran) if n == 1] == [2, 7, 16, 25]  # 2, 4, 8, 8 tokens at 2 between probes
    ran = drive(b, {2: 0.09, 1: 0.03}, 6)  # neighbours start: the next probe (token 34) wins
    assert b.chosen == 1 and ran[-2:] == [1, 1] and b.interval == 2


def test_a_busy_machine_moves_to_one_thread_and_back_when_the_neighbours_stop():
    b = BusyThreads(2, CFG)
    ran = drive(b, {2: 0.090, 1: 0.045}, 10)
    assert ran[8:10] == [1, 1] and b.chosen == 1
    ran = drive(b, {2: 0.090, 1: 0.045}, 10)
    assert ran[:8] == [1] * 8 and ran[8:10] == [2, 2] and b.chosen == 1  # the probe at 2 lost: stays at 1
    ran = drive(b, {2: 0.020, 1: 0.032}, 10)
    assert ran[8:10] == [2, 2] and b.chosen == 2


def test_within_the_margin_nothing_switches_and_one_thread_never_probes():
    b = BusyThreads(2, CFG)
    drive(b, {2: 0.020, 1: 0.0185}, 30)  # one thread 7.5% faster: under the 10% margin
    assert b.chosen == 2
    assert drive(BusyThreads(1, CFG), {1: 0.03}, 20) == [1] * 20
    b = BusyThreads(4, CFG)
    b.record(3, 0.001)  # a count it never asked for is ignored
    assert drive(b, {4: 0.05, 1: 0.02}, 10)[8:] == [1, 1] and b.chosen == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_one_call_decode_gives_the_same_bytes_at_any_thread_count(q4_k_m, dtype):
    """Every token alternating between 2 threads and 1 (a probe every token that always wins) against every token at
    2: the same greedy tokens and bit for bit the same logits."""
    from moepage.engine.engine import Engine, EngineConfig
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    engine = Engine.load(EngineConfig(q4_k_m["qwen3_moe"], dtype=dtype, tokenizer=False, ctx_size=128))
    try:
        token = engine.model._decode_kernel.token
        ids = list(range(7, 31))
        token.busy = BusyThreads(2, BusyThreadsConfig(probe_first=10**9))
        fixed_tokens, fixed = decode_logits(engine, ids, 12)
        assert token.busy.chosen == 2 and token.plan is not None
        flip = BusyThreads(2, BusyThreadsConfig(probe_first=0, probe_most=0, probe_tokens=1, window=1, margin=1e9))
        flip.record(2, 1.0)  # a first time at 2, so every probe (at the other count) wins and switches
        counts = []
        record = flip.record
        flip.record = lambda n, s, cpu=None: (counts.append(n), record(n, s))  # unmeasured: contended
        token.busy = flip
        tokens, logits = decode_logits(engine, ids, 12)
    finally:
        engine.close()
        torch.set_num_threads(before)
    assert {1, 2} <= set(counts) and len(counts) >= 12
    assert tokens == fixed_tokens and torch.equal(logits, fixed)




def test_probes_run_only_while_the_process_gets_less_cpu_than_its_threads_could_use():
    """Idle (1.7 of 2 cores busy): no token at one thread, ever; neighbours (0.8 cores): probes as before, and the
    faster count wins; an unmeasured token counts as contended."""
    b = BusyThreads(2, CFG)
    assert drive(b, {2: 0.020, 1: 0.032}, 64, cores=1.7) == [2] * 64
    ran = drive(b, {2: 0.090, 1: 0.045}, 16, cores=0.8)
    assert 1 in ran and b.chosen == 1
    b = BusyThreads(2, CFG)
    drive(b, {2: 0.020, 1: 0.032}, 20, cores=1.7)
    assert b.contended_now() is False
    b.record(2, 0.020)
    assert b.contended_now() is True
