"""Paging never changes the answer: expert budgets of 100%, 25% and the minimum, HF dir and split dir."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import prompt_ids
from moepage.cli import main as cli_main
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.moe import PreparedExpert
from moepage.engine.sampling import SamplingParams
from moepage.paging.budget import BudgetError
from moepage.paging.pread import ExpertReadError
from moepage.paging.safetensors_file import CheckpointError
from moepage.surgery.split import split_checkpoint, verify_split


def run(path, expert_cache_bytes=None, n=32, prompt_len=40, **kw):
    kw.setdefault("preload", False)  # page in on demand, so every budget exercises misses
    engine = Engine.load(EngineConfig(str(path), expert_cache_bytes=expert_cache_bytes, **kw))
    ids = prompt_ids(prompt_len, engine.args.vocab_size, seed=3)
    tokens = [s.token for s in engine.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))]
    stats = engine.cache.stats.snapshot()
    assert engine.cache.used_bytes <= engine.cache.budget
    engine.close()
    return tokens, stats, engine


def expert_bytes(engine):
    a = engine.args
    return PreparedExpert.nbytes_for(a.hidden_size, a.moe_intermediate_size, engine.model.dtype)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_budgets_give_identical_tokens(family, checkpoints):
    path = checkpoints(family, "bfloat16")
    full, full_stats, engine = run(path)
    assert full_stats["evictions"] == 0
    each = expert_bytes(engine)
    total = each * len(engine.args.moe_layers) * engine.args.num_experts
    for label, budget in (("100%", total), ("25%", total // 4), ("minimum", engine.args.top_k * each)):
        tokens, stats, _ = run(path, budget)
        assert tokens == full, f"{label} budget changed the output"
        assert stats["misses"] > 0
        if label != "100%":
            assert stats["evictions"] > 0, f"{label}: no eviction happened ({stats})"


def test_preload_reads_every_expert_at_load_when_all_fit(checkpoints):
    path = checkpoints("qwen3_moe", "bfloat16")
    want, _, _ = run(path)
    tokens, stats, engine = run(path, preload=None)  # the default: preload when the budget holds every expert
    assert tokens == want
    a = engine.args
    assert stats["misses"] == 0 and stats["prefetch_issued"] == len(a.moe_layers) * a.num_experts
    small = Engine.load(EngineConfig(str(path), expert_cache_bytes=expert_bytes(engine) * a.top_k * 2))
    assert small.cache.stats.prefetch_issued == 0 and small.cache.used_bytes == 0  # does not fit: on demand
    small.close()


def test_prefetch_off_same_tokens(checkpoints):
    path = checkpoints("mixtral", "bfloat16")
    a, _, engine = run(path, n=16)
    b, stats, _ = run(path, expert_bytes(engine) * 2, n=16, prefetch=False)
    assert a == b
    assert stats["prefetch_issued"] == 0


def test_budget_below_minimum_is_a_clear_error(checkpoints):
    path = checkpoints("olmoe", "float32")
    with pytest.raises(BudgetError, match="minimum budget is"):
        Engine.load(EngineConfig(str(path), memory_budget=1000))
    _, _, engine = run(path, n=2)
    with pytest.raises(BudgetError, match="one token needs 2 experts"):
        Engine.load(EngineConfig(str(path), expert_cache_bytes=expert_bytes(engine) * 2 - 1))


def test_memory_budget_splits_into_parts(checkpoints):
    path = checkpoints("qwen3_moe", "float32")
    engine = Engine.load(EngineConfig(str(path), memory_budget=2_000_000, ctx_size=256))
    p = engine.plan
    assert p.resident_bytes + p.kv_bytes + p.expert_cache_bytes <= 2_000_000
    assert "memory budget" in p.summary() and "experts" in p.summary()
    engine.close()


def test_split_serves_identical_tokens_and_verifies(checkpoints, tmp_path):
    src = checkpoints("qwen3_moe", "bfloat16")
    out = tmp_path / "split"
    manifest = split_checkpoint(str(src), str(out))
    assert manifest["format"] == "moepage-split"
    assert verify_split(str(out)) == []
    assert cli_main(["verify", str(out)]) == 0
    a, _, engine = run(src)
    b, _, _ = run(out)
    c, stats, _ = run(out, expert_bytes(engine) * 2)
    assert a == b == c
    assert stats["evictions"] > 0


def test_flipped_byte_is_reported_by_verify_and_at_page_in(checkpoints, tmp_path):
    src = checkpoints("qwen3_moe", "float32")
    out = tmp_path / "split"
    split_checkpoint(str(src), str(out))
    shard = out / "experts" / "L000" / "E0003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    problems = verify_split(str(out))
    assert len(problems) == 1 and "E0003.safetensors" in problems[0] and "sha256" in problems[0]
    assert cli_main(["verify", str(out)]) == 1
    engine = Engine.load(EngineConfig(str(out)))
    with pytest.raises(ExpertReadError, match=r"E0003\.safetensors.*layer 0 expert 3"):
        engine.cache.acquire((0, 3))
    engine.close()


def test_missing_shard_names_file_and_expert(checkpoints, tmp_path):
    src = checkpoints("qwen3_moe", "float32")
    out = tmp_path / "split"
    split_checkpoint(str(src), str(out))
    os.remove(out / "experts" / "L000" / "E0005.safetensors")
    assert any("E0005.safetensors: missing" in p for p in verify_split(str(out)))
    engine = Engine.load(EngineConfig(str(out)))
    with pytest.raises(ExpertReadError, match=r"E0005\.safetensors.*layer 0 expert 5 is missing"):
        engine.cache.acquire((0, 5))
    engine.close()


def test_truncated_original_shard_is_reported_with_its_path(checkpoints, tmp_path):
    src = checkpoints("mixtral", "float32")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Engine.load(EngineConfig(str(bad)))


def test_embedding_on_disk_gives_identical_tokens(checkpoints):
    path = checkpoints("qwen3_moe", "bfloat16")
    full, _, held = run(path)
    tokens, _, disk = run(path, embed_on_disk=True)
    assert tokens == full
    assert disk.model.embed is None and disk.plan.on_disk_bytes > 0
    assert disk.plan.resident_bytes == held.plan.resident_bytes - disk.plan.on_disk_bytes
    assert "read from disk row by row" in disk.plan.summary()
    with pytest.raises(IndexError, match="outside the embedding table"):
        disk.model.embed_rows(torch.tensor([disk.args.vocab_size]))


@pytest.mark.parametrize("direct", ["1", "0"])
def test_direct_and_buffered_reads_agree_and_experts_are_zero_copy(checkpoints, monkeypatch, direct):
    """O_DIRECT spans and buffered preads give the same bytes; an expert whose tensors lie back to back is
    kept in the buffer it was read into (gate and up rows form w13 without a copy)."""
    import moepage.paging.pread as pread
    from moepage.engine.checkpoint import open_checkpoint
    from moepage.engine.moe import prepare_expert
    from safetensors.torch import load_file

    monkeypatch.setattr(pread, "DIRECT_READS", direct == "1")
    path = checkpoints("qwen3_moe", "bfloat16")
    ckpt = open_checkpoint(str(path))
    ref = {}
    for f in path.glob("*.safetensors"):
        ref.update(load_file(str(f)))
    layer = ckpt.args.moe_layers[-1]
    w = ckpt.experts.read(layer, 3)
    names = ckpt.experts.names(layer, 3)
    for part in ("gate", "up", "down"):
        assert torch.equal(getattr(w, part), ref[names[part]])
    f = ckpt.experts.index.file_of(names["gate"], "expert")
    assert (f._direct_fd is not None) == (direct == "1")
    info = f.tensors[names["up"]]
    odd = f.read_span(info.start + 3, info.end - 5)  # unaligned both ends
    assert bytes(odd.numpy()) == bytes(ref[names["up"]].view(torch.uint8).reshape(-1)[3:-5].numpy())
    ex = prepare_expert(w, torch.bfloat16, "cpu")
    assert ex.w13.untyped_storage().data_ptr() == ex.w2.untyped_storage().data_ptr()
    assert ex.w13.untyped_storage().nbytes() <= PreparedExpert.nbytes_for(w.gate.shape[1], w.gate.shape[0], torch.bfloat16)
    assert torch.equal(ex.w13, torch.cat([ref[names["gate"]], ref[names["up"]]]))


def test_inspect_states_the_resident_bytes_a_budgeted_engine_holds(checkpoints, capsys):
    """`moepage inspect`'s budget table starts from what Engine.load keeps resident under a budget (embedding on
    disk, the lm_head in 12-bit form where the kernel runs), not from the checkpoint's bytes."""
    from moepage.paging.budget import human

    path = checkpoints("qwen3_moe", "bfloat16")
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    engine = Engine.load(EngineConfig(str(path), memory_budget=50_000_000, ctx_size=256))
    assert f"under a memory budget: {human(engine.plan.resident_bytes)} resident" in out
    engine.close()


def test_lru_eviction_cost_does_not_grow_with_the_cache():
    """With 50,000 resident experts an eviction (first victim, remove it, insert the newcomer) stays O(1): 2,000 of
    them take well under half a second (copying the order per eviction, as before, took seconds)."""
    import time

    from moepage.paging.policy import LRUPolicy

    p = LRUPolicy()
    for i in range(50_000):
        p.insert((i // 128, i % 128))
    t0 = time.perf_counter()
    for i in range(2_000):
        victim = next(p.victims())
        p.remove(victim)
        p.insert((1000 + i, 0))
    assert time.perf_counter() - t0 < 0.5
    assert next(p.victims()) == (2_000 // 128, 2_000 % 128)  # still least recently used first


# ---- layer-major prefill under a budget (engine/layered_prefill.py) ---------------------------------------
def _prefill_reads(path, monkeypatch, layer_major: bool, **kw):
    """(logits after prefill, greedy tokens, reads per (layer, expert) during the prefill) of a 40-token prompt in
    8-token chunks."""
    import moepage.engine.sequence as sequence

    if not layer_major:
        monkeypatch.setattr(sequence, "prefill_span", lambda *a: None)
    engine = Engine.load(EngineConfig(str(path), prefill_chunk=8, preload=False, threads=1, **kw))
    reads: dict = {}
    load = engine.cache.load

    def counted(layer, e, *rest):
        reads[(layer, e)] = reads.get((layer, e), 0) + 1
        return load(layer, e, *rest)

    engine.cache.load = counted
    ids = prompt_ids(40, engine.args.vocab_size, seed=5)
    logits = engine.prefill(ids)
    engine.cache.wait_idle()
    during = dict(reads)
    tokens = [s.token for s in engine.generate(ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))]
    engine.close()
    monkeypatch.undo()
    return logits, tokens, during, engine


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_layer_major_prefill_reads_each_expert_once_and_changes_nothing(family, tmp_path, tokenizer_dir,
                                                                        monkeypatch):
    """Under a budget of 2.5 layers' experts a 5-chunk prompt runs layer by layer: no expert is read twice during
    the prefill (chunk by chunk, the same budget reads some again), and the logits are bit for bit those of the
    unlimited, chunk-by-chunk run (dense and shared-expert layers included)."""
    from conftest import make_checkpoint

    torch.set_num_threads(1)
    path = make_checkpoint(tmp_path / family, family, tokenizer_dir, torch.bfloat16, num_hidden_layers=5)
    full_logits, full_tokens, _, engine = _prefill_reads(path, monkeypatch, layer_major=True)
    each = expert_bytes(engine)
    budget = int(2.5 * engine.args.num_experts * each)
    logits, tokens, reads, engine = _prefill_reads(path, monkeypatch, True, expert_cache_bytes=budget)
    assert engine.plan.fraction_resident < 1.0
    assert torch.equal(logits, full_logits) and tokens == full_tokens
    assert reads and max(reads.values()) == 1, reads
    _, chunked_tokens, chunked_reads, _ = _prefill_reads(path, monkeypatch, False, expert_cache_bytes=budget)
    assert chunked_tokens == full_tokens
    assert max(chunked_reads.values()) > 1  # the test can fail: chunk by chunk this budget reads experts again


def test_layer_major_prefill_leaves_a_prefix_the_prompt_cache_reuses_exactly(tmp_path, tokenizer_dir):
    """A layer-major prefill marks the same chunk ends as chunk by chunk: the next prompt re-uses its prefix and
    decodes the tokens a fresh, unlimited engine gives."""
    from conftest import make_checkpoint

    torch.set_num_threads(1)
    path = make_checkpoint(tmp_path / "q", "qwen3_moe", tokenizer_dir, torch.bfloat16, num_hidden_layers=5)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    fresh = Engine.load(EngineConfig(str(path), prefill_chunk=8, threads=1))
    first = prompt_ids(37, fresh.args.vocab_size, seed=6)
    second = first + prompt_ids(20, fresh.args.vocab_size, seed=7)
    want = [s.token for s in fresh.generate(second, greedy)]
    each = expert_bytes(fresh)
    fresh.close()
    paged = Engine.load(EngineConfig(str(path), prefill_chunk=8, threads=1, preload=False, prefix_cache=True,
                                     expert_cache_bytes=int(2.5 * fresh.args.num_experts * each)))
    list(paged.generate(first, greedy))
    got = [s.token for s in paged.generate(second, greedy)]
    assert paged.last_stats.cached_prompt_tokens == 32  # four whole chunks of the first prompt
    assert got == want
    paged.close()


def test_lfu_victims_are_the_sorted_order_of_aged_counts():
    """LFUPolicy's heap gives exactly the order of a brute-force sort of counts that halve every half_life accesses
    (ties: least recently used first), through inserts, touches, removals and many half-lives."""
    import random

    from moepage.paging.policy import LFUPolicy

    rng = random.Random(0)
    p, counts, last, clock = LFUPolicy(half_life=7), {}, {}, 0
    p.RESCALE = 3  # rescales happen inside the run too
    for step in range(3_000):
        key = (rng.randrange(4), rng.randrange(12))
        op = rng.random()
        if op < 0.15 and counts:
            gone = rng.choice(sorted(counts))
            p.remove(gone)
            counts.pop(gone), last.pop(gone)
            continue
        if op < 0.55 or key in counts:
            clock += 1
            if clock % 7 == 0:
                counts = {k: v * 0.5 for k, v in counts.items()}
            counts[key] = counts.get(key, 0.0) + 1.0
            last[key] = clock
            (p.insert if op < 0.55 else p.touch)(key)
        if step % 50 == 0:
            assert list(p.victims()) == sorted(counts, key=lambda k: (counts[k], last[k]))


def test_lfu_eviction_cost_does_not_grow_with_the_cache():
    """50,000 resident experts: 2,000 evictions (first victim, remove it, insert and touch the newcomer) take well
    under a second (a sort per eviction took minutes)."""
    import time

    from moepage.paging.policy import LFUPolicy

    p = LFUPolicy()
    for i in range(50_000):
        p.insert((i // 128, i % 128))
    t0 = time.perf_counter()
    for i in range(2_000):
        victim = next(p.victims())
        p.remove(victim)
        p.insert((1000 + i, 0))
        p.touch((1000 + i, 0))
    assert time.perf_counter() - t0 < 1.0
    assert next(p.victims()) == (2_000 // 128, 2_000 % 128)  # untouched experts in insertion order, oldest first
