"""`moepage` is one consistent tool: the same MODEL everywhere (`demo` included), help on every option, sizes that
say how they were read, one-line errors, progress on long jobs, and failures that come in seconds."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from moepage.cli import build_parser, main
from moepage.demo import demo_model_path

MODEL_VERBS = ["serve", "generate", "inspect", "bench", "profile", "split", "extract", "prune", "train", "probe"]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_and_argument_has_help():
    missing = [f"{verb} {a.option_strings[0] if a.option_strings else a.dest}"
               for verb, p in subparsers().items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert missing == []
    upcycle = next(a for a in subparsers()["upcycle"]._actions if a.dest == "shared")
    assert upcycle.help.count("default") == 1


def test_every_verb_that_reads_a_model_takes_it_positionally_and_as_demo():
    for verb in MODEL_VERBS:
        first = next(a for a in subparsers()[verb]._actions if not a.option_strings and a.dest != "help")
        assert "`demo`" in first.help, verb
    for verb, extra in (("generate", []), ("inspect", []), ("profile", ["--domain", "a=x"]), ("bench", [])):
        assert build_parser().parse_args([verb, "./x", *extra]).model == "./x"


def test_demo_and_no_model_mean_the_builtin_model(capsys):
    assert main(["inspect", "demo"]) == 0
    by_name = capsys.readouterr().out
    assert main(["inspect"]) == 0
    assert capsys.readouterr().out == by_name and demo_model_path() in by_name
    assert "1 expert:" in by_name and "1 experts" not in by_name  # the demo model routes each token to one expert


def test_generate_takes_the_model_positionally_or_as_a_flag(capsys):
    assert main(["generate", "demo", "--prompt", "def f(", "--max-tokens", "2", "--memory-budget", "60MB"]) == 0
    err = capsys.readouterr().err
    assert "--memory-budget 60MB = 60,000,000 bytes = 57.2 MiB (MB: powers of 1000; 60MiB or 60M: 60.0 MiB)" in err
    assert main(["generate", "--model", "demo", "--max-tokens", "1"]) == 0
    assert main(["generate", "demo", "--model", "./other", "--max-tokens", "1"]) == 2
    assert "two models given" in capsys.readouterr().err
    assert main(["generate", "demo", "--memory-budget", "5MiB"]) == 2  # below the demo model's minimum
    err = capsys.readouterr().err
    assert "one token needs 1 expert x" in err and "1 experts" not in err


def test_sizes_say_how_they_were_read_and_bad_ones_fail_in_one_line(capsys):
    from moepage.cli import Size

    assert Size("6GB") == 6 * 10**9 and Size("6G") == Size("6GiB") == 6 << 30
    assert Size("6GB").describe() == "6GB = 6,000,000,000 bytes = 5.6 GiB (GB: powers of 1000; 6GiB or 6G: 6.0 GiB)"
    assert Size("6G").describe() == "6G = 6,442,450,944 bytes = 6.0 GiB (G: powers of 1024; 6GB: 5.6 GiB)"
    with pytest.raises(SystemExit):
        main(["serve", "--memory-budget", "lots"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("argument --memory-budget: cannot parse size 'lots'; use e.g. 6GB, 6GiB, 512MiB or a byte "
                        "count")
    assert "parse_size" not in err


def test_upcycle_reports_a_sentence_not_json(tmp_path, capsys):
    from test_train import tiny_dense

    tiny_dense().save_pretrained(str(tmp_path / "dense"))
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "2", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote qwen2_moe to ") and "2 routed experts per layer, top-1, 1 shared expert" in out
    with pytest.raises(ValueError):
        json.loads(out)


# ---- split of a GGUF, and what start-up suggests for one ----------------------------------------------------
@pytest.fixture(scope="module")
def demo_ggufs(tmp_path_factory):
    from moepage.surgery.gguf_export import write_gguf

    d = tmp_path_factory.mktemp("gguf")
    return {t: write_gguf(demo_model_path(), str(d / f"demo-{t}.gguf"), t)["path"] for t in ("q8_0", "bf16")}


def test_split_of_a_gguf_through_the_cli(demo_ggufs, tmp_path, capsys):
    assert main(["split", demo_ggufs["q8_0"], str(tmp_path / "split")]) == 0
    assert "wrote 17 files" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "split")]) == 0
    assert main(["split", demo_ggufs["q8_0"], str(tmp_path / "again"), "--lossless"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lossless encodes bf16 safetensors experts" in err
    assert not (tmp_path / "again").exists()


def test_no_lossless_hint_for_a_bf16_gguf(demo_ggufs):
    """`split X.gguf OUT --lossless` is refused, so start-up must not suggest it for a GGUF, even a BF16 one."""
    from moepage.engine.engine import Engine, EngineConfig

    engine = Engine.load(EngineConfig(demo_ggufs["bf16"], memory_budget=12 * 10**6, ctx_size=256))
    try:
        assert engine.plan.fraction_resident < 1.0 and "--lossless" not in engine.memory_summary()
    finally:
        engine.close()


# ---- progress, and reading only what the cap needs ------------------------------------------------------------
def test_profile_reads_files_only_until_the_token_cap_and_shows_progress(tmp_path, monkeypatch, capsys):
    code = tmp_path / "code"
    code.mkdir()
    for i in range(40):
        (code / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    (tmp_path / "big.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200_000)  # 8.8 MB
    monkeypatch.setenv("TQDM_DELAY", "0")
    out = tmp_path / "p.json"
    t0 = time.perf_counter()
    assert main(["profile", demo_model_path(), "--domain", f"code={code}", "--domain", f"prose={tmp_path / 'big.txt'}",
                 "-o", str(out), "--max-tokens", "64", "--max-seq", "32", "--no-heatmap"]) == 0
    assert time.perf_counter() - t0 < 60
    domains = json.loads(out.read_text())["domains"]
    assert [os.path.basename(s["path"]) for s in domains["code"]["sources"]] == ["m00.py"]
    assert domains["prose"]["sources"][0]["chars"] <= 64 * 32  # a big file is read only as far as the cap needs
    assert all(d["tokens"] == 64 for d in domains.values())
    err = capsys.readouterr().err
    assert "profile code: 100%" in err and "profile prose: 100%" in err


def test_expert_preload_shows_progress(monkeypatch, capsys):
    from moepage.engine.engine import Engine, EngineConfig

    monkeypatch.setenv("TQDM_DELAY", "0")
    engine = Engine.load(EngineConfig(demo_model_path(), ctx_size=64))
    engine.close()
    assert "reading experts" in capsys.readouterr().err


def test_cached_kernels_are_not_announced_as_compiling():
    from moepage.kernels import native

    if not native.runs_here("bf16_decode") or native.load("bf16_decode") is None:
        pytest.skip("the bf16_decode kernel does not run on this CPU")
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from moepage.kernels import native; assert native.load('bf16_decode') is not None")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "compiling" not in done.stderr and native.is_built("bf16_decode")


# ---- the Hub, unreachable -------------------------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def resolve_unreachable(tmp_path, spec: str, cache: str | None = None) -> tuple[dict, str, float]:
    """resolve_model(spec) in a fresh interpreter whose Hub endpoint refuses connections."""
    code = ("import json, logging, sys\n"
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from moepage.server.model_source import ModelNotFound, resolve_model\n"
            "try:\n"
            "    r = resolve_model(sys.argv[1])\n"
            "    print(json.dumps({'path': r.path, 'kind': r.kind}))\n"
            "except ModelNotFound as e:\n"
            "    print(json.dumps({'error': str(e)}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_CACHE=cache or str(tmp_path / "empty-cache"))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr, time.perf_counter() - t0


@pytest.mark.parametrize("spec", ["nobody-here/no-such-moe", "nobody-here/no-such-moe:Q4_K_M",
                                  "nobody-here/no-such-moe/model.gguf"])
def test_a_hub_id_fails_in_seconds_when_the_hub_cannot_be_reached(tmp_path, spec):
    r, log, seconds = resolve_unreachable(tmp_path, spec)
    assert seconds < 15, f"took {seconds:.1f} s"  # the old code retried the listing 5 times with backoff (~25 s)
    assert "nobody-here/no-such-moe" in r["error"] and "cannot be reached" in r["error"]
    assert "\n" not in r["error"]
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert len(lines) == len(set(lines)) and len(lines) <= 1, log


def test_an_unreachable_hub_falls_back_to_the_cache_at_once(tmp_path):
    from test_server_cli import hf_cache

    cache = tmp_path / "hub"
    snap = hf_cache(cache, "someone/tiny-GGUF", ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"])
    r, log, seconds = resolve_unreachable(tmp_path, "someone/tiny-GGUF:Q8_0", str(cache))
    assert r == {"path": os.path.join(snap, "tiny-Q8_0.gguf"), "kind": "hub-gguf"} and seconds < 15
    assert log.count("did not answer") == 1 and "using the local cache" in log


def test_a_lock_left_by_a_killed_kernel_build_does_not_hang_the_next_start():
    """torch waits forever on the lock file of a build that was killed (Ctrl-C during the first compile)."""
    from moepage.kernels import native

    name = next((n for n in ("bf16_unpack", "bf16_decode") if native.runs_here(n) and native.load(n) is not None), None)
    if name is None:
        pytest.skip("no C++ kernel runs on this CPU")
    lock = os.path.join(native.build_directory(name), "lock")
    open(lock, "w").close()  # what a killed build leaves behind
    code = f"from moepage.kernels import native; assert native.load({name!r}) is not None"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    finally:
        if os.path.exists(lock):
            os.remove(lock)
    assert done.returncode == 0, done.stderr
    assert "removed the lock a killed build left" in done.stderr
