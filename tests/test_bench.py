"""`moepage bench`: the measurement on a real checkpoint, pre-gating counters, traces and their replay."""
from __future__ import annotations

import json


from conftest import prompt_ids
from moepage.cli import main as cli_main
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.moe import PreparedExpert
from moepage.engine.sampling import SamplingParams
from moepage.paging.trace import load_trace, replay


def test_pregating_predicts_next_layer_and_keeps_tokens(checkpoints, tmp_path):
    path = str(checkpoints("mixtral", "bfloat16"))
    full = Engine.load(EngineConfig(path))
    ids = prompt_ids(24, full.args.vocab_size, seed=4)
    want = [s.token for s in full.generate(ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))]
    a = full.args
    each = PreparedExpert.nbytes_for(a.hidden_size, a.moe_intermediate_size, full.model.dtype)
    full.close()
    trace = tmp_path / "t.jsonl"
    paged = Engine.load(EngineConfig(path, expert_cache_bytes=each * (a.top_k + 2), trace=str(trace), pregate=True))
    assert all(b.pregate for b in paged.model.moe_blocks)
    got = [s.token for s in paged.generate(ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))]
    s = paged.cache.stats.snapshot()
    paged.close()
    assert got == want
    # every decode step after the first layer is predicted: 11 steps x (layers - 1) x top_k experts
    assert s["guess_needed"] == 11 * (len(a.moe_layers) - 1) * a.top_k
    assert 0 < s["guess_correct"] <= s["guess_predicted"]
    keys = load_trace(str(trace))
    assert len(keys) == s["hits"] + s["misses"]
    assert replay(keys, "lru", 10**6).hits == len(keys) - len(set(keys))


def test_bench_cli_measures_and_replays(checkpoints, tmp_path, capsys):
    path = str(checkpoints("qwen3_moe", "bfloat16"))
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(prompt_ids(20, 300, seed=2)))
    out, trace = tmp_path / "r.json", tmp_path / "t.jsonl"
    assert cli_main(["bench", path, "--prompt-ids", str(ids), "--decode", "6", "--json", str(out),
                     "--trace", str(trace), "--expert-cache", "200KB"]) == 0
    r = json.loads(out.read_text())
    assert r["n_decoded"] == 6 and r["decode_tps"] > 0 and r["cache"]["misses"] > 0
    assert "decode 6 tokens" in capsys.readouterr().out
    assert cli_main(["bench", "--replay", str(trace), "--capacity", "2,4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["capacity"] for r in rows] == [2, 4] and set(rows[0]) == {"capacity", "lru", "lfu", "stale"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"l": 1}\n')
    assert cli_main(["bench", "--replay", str(bad)]) == 2
    assert "expected" in capsys.readouterr().err


def test_auto_policy_is_stale_below_one_tokens_experts(checkpoints):
    path = str(checkpoints("mixtral", "bfloat16"))
    full = Engine.load(EngineConfig(path))
    a = full.args
    each = PreparedExpert.nbytes_for(a.hidden_size, a.moe_intermediate_size, full.model.dtype)
    full.close()
    per_token = len(a.moe_layers) * a.top_k
    small = Engine.load(EngineConfig(path, expert_cache_bytes=each * (per_token - 1)))
    large = Engine.load(EngineConfig(path, expert_cache_bytes=each * per_token))
    fixed = Engine.load(EngineConfig(path, expert_cache_bytes=each * (per_token - 1), policy="lfu"))
    assert (small.cache.policy.name, large.cache.policy.name, fixed.cache.policy.name) == ("stale", "lru", "lfu")
    for e in (small, large, fixed):
        e.close()
