"""`moepage serve owner/repo --lazy` against a local Hub stand-in (tests/hub_standin.py): experts by HTTP range on
their first miss, a disk tier under a budget, atomic writes, offline serving, 503 for a miss the Hub cannot give,
`moepage prefetch`, /metrics per tier. moepage runs in subprocesses: HF_ENDPOINT must be set before
huggingface_hub is imported."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import httpx
import pytest

from hub_standin import HubStandIn
from moepage.paging.disk_tier import DiskTier, HashLog, TierStats, write_atomic
from moepage.paging.pread import ExpertReadError
from moepage.demo import DemoSpec, build_demo_model
from server_support import ServeProcess, load_engine, serving

SPEC = DemoSpec(layers=2, experts=32, vocab=400)  # top-2: a short request uses few of the 64 experts
EXPERTS = SPEC.layers * SPEC.experts

PROMPTS = ["def add(a, b):", "The weather in Paris is"]
LONG = "Once upon a time, in a land of rivers and hills, " * 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HF checkpoint dir, its `moepage split`, greedy reference texts {(prompt, max_tokens): text})."""
    from moepage.surgery.split import split_checkpoint

    d = tmp_path_factory.mktemp("hub-models")
    model = build_demo_model(d / "model", SPEC)
    split = str(d / "split")
    split_checkpoint(model, split)
    ref = {}
    with serving(load_engine(model)) as (url, _):
        for prompt, n in [(p, 8) for p in PROMPTS] + [(PROMPTS[0], 2), (LONG, 8)]:
            ref[(prompt, n)] = complete(url, prompt, n).json()["choices"][0]["text"]
    return model, split, ref


def complete(url: str, prompt: str, n: int):
    return httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0},
                      timeout=120)


def hub_env(hub: HubStandIn | None, cache: str, **extra) -> dict:
    """The environment of a moepage subprocess using hub (None: a Hub that does not answer) and cache."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HUB_CACHE=cache, HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1",
               HF_ENDPOINT=hub.url if hub is not None else "http://127.0.0.1:9", **extra)  # port 9: nobody listens
    return env


class LazyServe(ServeProcess):
    """`moepage serve REPO --lazy` with its own environment."""

    def __init__(self, repo: str, env: dict, *flags: str):
        super().__init__([repo, "--lazy", "--threads", "1", "--ctx-size", "256", *flags])
        self.env = env

    def start(self, timeout: float = 300.0) -> "LazyServe":
        """Output goes to a file (a pipe nobody reads could fill and stall the server); its tail is in any error."""
        import tempfile

        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, text=True)
        if self.wait_healthy(timeout):
            return self
        self.stop()
        self.log.seek(0)
        raise RuntimeError(f"moepage serve did not answer /health on {self.url} (exit {self.proc.returncode}): "
                           f"{self.log.read()[-2000:]}")


def swallow(fn, *args):
    try:
        fn(*args)
    except httpx.HTTPError:
        pass  # the server was killed under it


def lazy_dir(cache: str, repo: str) -> str:
    root = os.path.join(cache, "moepage-lazy", "models--" + repo.replace("/", "--"))
    with open(os.path.join(root, "refs", "main")) as f:
        return os.path.join(root, f.read().strip())


def tier_files(d: str) -> dict[str, int]:
    out = {}
    for dirpath, _, names in os.walk(os.path.join(d, "experts")):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, d)] = os.path.getsize(p)
    return out


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_lazy_checkpoint_serves_the_local_tokens_one_range_request_per_expert(models, tmp_path):
    model, _, ref = models
    short = (PROMPTS[0], 2)
    size = os.path.getsize(os.path.join(model, "model.safetensors"))
    with HubStandIn({"me/demo": model}) as hub:
        with LazyServe("me/demo", hub_env(hub, str(tmp_path))) as p:
            assert complete(p.url, *short).json()["choices"][0]["text"] == ref[short]
            d = lazy_dir(str(tmp_path), "me/demo")
            gets = hub.gets("model.safetensors")
            assert all(r is not None for _, r in gets)  # never the whole file without a range
            sent = sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for _, r in gets)
            assert 0 < len(tier_files(d)) < EXPERTS and sent < size  # the experts not used were not downloaded
            for prompt in PROMPTS:
                r = complete(p.url, prompt, 8)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == ref[(prompt, 8)]
            m = httpx.get(p.url + "/metrics").text
        fetched = tier_files(d)
        misses = metric(m, "moepage_expert_page_in_seconds_count")  # an unlimited memory tier reads each expert once
        assert len(hub.gets("model.safetensors")) == 5 + misses  # two header reads, three resident runs; then one
        assert len(fetched) == misses  # request and one file per miss
        assert metric(m, "moepage_expert_tier_hits_total", tier="hub") == misses
        assert metric(m, "moepage_expert_tier_hits_total", tier="memory") > 0
        assert metric(m, "moepage_expert_tier_bytes_total", tier="hub") == sum(fetched.values())
        assert metric(m, "moepage_hub_fetch_seconds_count") == misses


def test_split_upload_serves_one_whole_file_per_miss_checked_by_the_manifest(models, tmp_path):
    _, split, ref = models
    with HubStandIn({"me/demo-split": split}) as hub:
        with LazyServe("me/demo-split", hub_env(hub, str(tmp_path))) as p:
            r = complete(p.url, PROMPTS[1], 8)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == ref[(PROMPTS[1], 8)]
        d = lazy_dir(str(tmp_path), "me/demo-split")
        fetched = tier_files(d)
        gets = hub.gets("experts/")
        assert sorted(path for path, _ in gets) == sorted(fetched)
        for path, rng in gets:
            assert rng == f"bytes=0-{os.path.getsize(os.path.join(split, path)) - 1}"
            with open(os.path.join(d, path), "rb") as a, open(os.path.join(split, path), "rb") as b:
                assert a.read() == b.read()


def test_disk_budget_is_held_with_experts_evicted_and_fetched_again(models, tmp_path):
    model, _, ref = models
    budget = 600_000  # about six of the demo's 96 KiB experts
    with HubStandIn({"me/demo": model}) as hub:
        # memory: two experts; two readers, so the disk tier's floor (a staged expert per reader and one more) fits
        flags = ["--disk-budget", str(budget), "--expert-cache", "250000", "--io-threads", "2"]
        with LazyServe("me/demo", hub_env(hub, str(tmp_path)), *flags) as p:
            for prompt in PROMPTS + [LONG]:
                r = complete(p.url, prompt, 8)
                assert r.json()["choices"][0]["text"] == ref[(prompt, 8)]
                assert sum(tier_files(lazy_dir(str(tmp_path), "me/demo")).values()) <= budget
            m = httpx.get(p.url + "/metrics").text
        assert metric(m, "moepage_disk_tier_evictions_total") > 0
        assert metric(m, "moepage_disk_tier_used_bytes") <= budget
        assert metric(m, "moepage_expert_tier_hits_total", tier="disk") > 0


def test_a_server_killed_mid_fetch_leaves_nothing_half_written_that_is_used(models, tmp_path):
    model, _, ref = models
    with HubStandIn({"me/demo": model}) as hub:
        p = LazyServe("me/demo", hub_env(hub, str(tmp_path))).start()
        hub.stall = {"model.safetensors"}  # the next expert's bytes stop halfway
        t = threading.Thread(target=lambda: swallow(complete, p.url, PROMPTS[0], 8), daemon=True)
        t.start()
        assert hub.stalled.wait(60)
        p.proc.kill()
        p.proc.wait(10)
        hub.stall = set()
        hub.release.set()
        d = lazy_dir(str(tmp_path), "me/demo")
        # what a kill inside the atomic write would leave (a temporary), a file whose hash line never got written,
        # and a torn last hash line
        os.makedirs(os.path.join(d, "experts", "L000"), exist_ok=True)
        with open(os.path.join(d, "experts", "L000", ".E0001.safetensors.77.tmp"), "wb") as f:
            f.write(b"\0" * 5000)
        with open(os.path.join(d, "experts", "L000", "E0002.safetensors"), "wb") as f:
            f.write(b"\0" * 5000)
        with open(os.path.join(d, "expert-hashes.txt"), "a") as f:
            f.write("experts/L000/E0002.safetensors 00")
        with LazyServe("me/demo", hub_env(hub, str(tmp_path))) as p2:
            for prompt in PROMPTS:
                assert complete(p2.url, prompt, 8).json()["choices"][0]["text"] == ref[(prompt, 8)]
        files = tier_files(d)
        assert not [f for f in files if f.endswith(".tmp")]
        recorded = {}
        for line in open(os.path.join(d, "expert-hashes.txt")).read().split("\n"):
            parts = line.split(" ")
            if len(parts) == 4 and len(parts[1]) == 64:
                recorded[parts[0]] = parts[1]
        for rel in files:  # every file left is whole and matches its recorded sha256
            with open(os.path.join(d, rel), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == recorded[rel.replace(os.sep, "/")]


def test_offline_the_disk_tier_serves_and_a_miss_is_a_503_while_the_server_keeps_serving(models, tmp_path):
    model, _, ref = models
    short = (PROMPTS[0], 2)
    with HubStandIn({"me/demo": model}) as hub:
        with LazyServe("me/demo", hub_env(hub, str(tmp_path))) as p:
            assert complete(p.url, *short).json()["choices"][0]["text"] == ref[short]
    held = tier_files(lazy_dir(str(tmp_path), "me/demo"))
    assert 0 < len(held) < EXPERTS  # the long prompt below needs experts the tier lacks
    for env in (hub_env(None, str(tmp_path)), hub_env(None, str(tmp_path), HF_HUB_OFFLINE="1")):
        with LazyServe("me/demo", env) as p:  # the Hub is gone (nothing listens) / offline mode
            assert complete(p.url, *short).json()["choices"][0]["text"] == ref[short]
            r = complete(p.url, LONG, 8)
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["code"] == "expert_read_failed" and "me/demo" in err["message"]
            assert complete(p.url, *short).json()["choices"][0]["text"] == ref[short]
            assert httpx.get(p.url + "/health").status_code == 200


def test_prefetch_fills_the_tier_with_the_domains_hottest_experts_then_serves_offline(models, tmp_path):
    model, _, ref = models
    counts = [[0] * SPEC.experts, [0] * SPEC.experts]
    counts[0][1], counts[0][5], counts[1][2] = 30, 10, 20  # hottest: (0, 1), then (1, 2), then (0, 5)
    zeros = [[0.0] * SPEC.experts, [0.0] * SPEC.experts]
    domain = {"tokens": 60, "nll": 1.0, "count": counts, "mass": counts, "mean_norm": zeros, "saliency": zeros,
              "avg_gate": zeros}
    profile = {"format": "moepage-profile", "version": 1,
               "model": {"name": "demo", "family": "qwen3_moe", "num_experts": SPEC.experts, "top_k": 2,
                         "moe_layers": [0, 1]},
               "domains": {"code": domain}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    cmd = [sys.executable, "-m", "moepage.cli", "prefetch", "me/demo", "--profile", str(path), "--domain", "code"]
    with HubStandIn({"me/demo": model}) as hub:
        r = subprocess.run(cmd + ["--experts", "2"], env=hub_env(hub, str(tmp_path)), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        d = lazy_dir(str(tmp_path), "me/demo")
        assert sorted(tier_files(d)) == ["experts/L000/E0001.safetensors", "experts/L001/E0002.safetensors"]
        r = subprocess.run(cmd, env=hub_env(hub, str(tmp_path)), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "1 fetched" in r.stdout
        assert len(tier_files(d)) == 3
        assert len(hub.gets("model.safetensors")) == 5 + 3  # each expert fetched once
    bad = subprocess.run(cmd[:-1] + ["poetry"], env=hub_env(None, str(tmp_path)), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown domain 'poetry'" in bad.stderr


@pytest.fixture(scope="module")
def gguf_models(models, tmp_path_factory):
    """(a folder holding the demo as one Q8_0 GGUF, a folder with its GGUF split, reference texts)."""
    from moepage.surgery.gguf_export import write_gguf
    from moepage.surgery.split_gguf import split_gguf

    model = models[0]
    d = tmp_path_factory.mktemp("hub-gguf")
    os.makedirs(d / "repo")
    path = str(d / "repo" / "demo-Q8_0.gguf")
    write_gguf(model, path, "q8_0")
    split_gguf(path, str(d / "split"))
    with serving(load_engine(path)) as (url, _):
        ref = {p: complete(url, p, 8).json()["choices"][0]["text"] for p in PROMPTS}
    return str(d / "repo"), str(d / "split"), ref


def test_lazy_gguf_and_gguf_split_serve_the_local_gguf_tokens(gguf_models, tmp_path):
    repo, split, ref = gguf_models
    gguf = os.path.join(repo, "demo-Q8_0.gguf")
    with HubStandIn({"me/demo-gguf": repo, "me/demo-gguf-split": split}) as hub:
        with LazyServe("me/demo-gguf:Q8_0", hub_env(hub, str(tmp_path))) as p:
            for prompt in PROMPTS:
                r = complete(p.url, prompt, 8)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == ref[prompt]
            m = httpx.get(p.url + "/metrics").text
        fetched = metric(m, "moepage_expert_tier_hits_total", tier="hub")
        d = [e for e in os.listdir(os.path.join(str(tmp_path), "moepage-lazy", "models--me--demo-gguf"))
             if e.endswith(".demo-Q8_0.gguf")]
        assert len(d) == 1 and len(tier_files(os.path.join(str(tmp_path), "moepage-lazy", "models--me--demo-gguf",
                                                           d[0]))) == fetched
        assert 0 < fetched < EXPERTS
        from moepage.paging.gguf_file import GGUFFile

        f = GGUFFile(gguf)
        exps = [i for n, i in f.tensors.items() if "_exps" in n]
        f.close()
        slices = {(i.start + e * (i.nbytes // SPEC.experts), i.start + (e + 1) * (i.nbytes // SPEC.experts))
                  for i in exps for e in range(SPEC.experts)}  # every expert's slice of every _exps tensor
        spans = [(int(r.split("=")[1].split("-")[0]), int(r.split("-")[1]) + 1) for _, r in hub.gets("demo-Q8_0.gguf")]
        into_experts = [sp for sp in spans if any(a <= sp[0] < b for a, b in slices)]
        header_window = [sp for sp in into_experts if sp not in slices]  # the parser's first window of the file
        assert len(header_window) <= 1 and all(sp[0] < 1 << 20 for sp in header_window)
        assert len([sp for sp in into_experts if sp in slices]) == 3 * fetched  # three slices per expert, no more
        import shutil

        shutil.rmtree(os.path.join(str(tmp_path), "moepage-lazy", "models--me--demo-gguf", d[0], "experts"))
        with LazyServe("me/demo-gguf:Q8_0", hub_env(hub, str(tmp_path), HF_HUB_OFFLINE="1")) as p:
            r = complete(p.url, PROMPTS[0], 2)  # starts without a fetch; the request then needs one
            assert r.status_code == 503 and r.json()["error"]["code"] == "expert_read_failed"
        with LazyServe("me/demo-gguf-split", hub_env(hub, str(tmp_path))) as p:
            assert complete(p.url, PROMPTS[1], 8).json()["choices"][0]["text"] == ref[PROMPTS[1]]
        assert hub.gets("experts/") and all(r.startswith("bytes=0-") for _, r in hub.gets("experts/"))


# ---- the disk tier and its hash log, no network ------------------------------------------------------------
def test_disk_tier_evicts_least_recently_used_never_a_pinned_file_and_drops_temporaries(tmp_path):
    root = str(tmp_path)
    os.makedirs(tmp_path / "experts" / "L000")
    (tmp_path / "experts" / "L000" / ".E0009.safetensors.1.tmp").write_bytes(b"half")
    tier = DiskTier(root, budget=300)
    assert len(tier) == 0 and not os.path.exists(tmp_path / "experts" / "L000" / ".E0009.safetensors.1.tmp")
    for e in range(3):
        tier.store(f"experts/L000/E{e:04d}.safetensors", bytes([e]) * 100)
    assert tier.lookup("experts/L000/E0000.safetensors")  # now the most recent
    with tier.pinned("experts/L000/E0001.safetensors"):
        tier.store("experts/L000/E0003.safetensors", b"x" * 100)  # E0001 is pinned: E0002 leaves
        assert sorted(tier.keys()) == ["experts/L000/E0000.safetensors", "experts/L000/E0001.safetensors",
                                       "experts/L000/E0003.safetensors"]
        tier.resize(100)  # only the pinned file may stay... and the budget holds nothing more
        assert tier.keys() == ["experts/L000/E0001.safetensors"]
        with pytest.raises(ExpertReadError, match="disk tier's budget"):
            tier.store("experts/L000/E0004.safetensors", b"y" * 100)
    assert tier.used_bytes <= 100 and tier.stats.evictions == 3
    reopened = DiskTier(root, budget=100, stats=TierStats())
    assert reopened.keys() == ["experts/L000/E0001.safetensors"]
    assert open(reopened.path("experts/L000/E0001.safetensors"), "rb").read() == bytes([1]) * 100


def test_hash_log_ignores_torn_lines_and_other_etags(tmp_path):
    log = HashLog(str(tmp_path / "hashes.txt"))
    log.append("experts/L000/E0000.safetensors", "a" * 64, 10, "etag1")
    log.append("experts/L000/E0001.safetensors", "b" * 64, 10, "etag1")
    with open(tmp_path / "hashes.txt", "a") as f:
        f.write("experts/L000/E0002.safetensors " + "c" * 64)  # torn: no size, no etag, no newline
    etags = {f"experts/L000/E000{e}.safetensors": "etag1" for e in range(3)}
    etags["experts/L000/E0001.safetensors"] = "etag2"  # the Hub file changed: that record no longer vouches
    assert log.load(etags) == {"experts/L000/E0000.safetensors": ("a" * 64, 10)}
    with pytest.raises(ExpertReadError):
        log.append("experts/L000/E0000.safetensors", "a" * 64, 10, "bad etag")


def test_write_atomic_replaces_whole(tmp_path):
    p = str(tmp_path / "d" / "f.bin")
    write_atomic(p, b"one")
    write_atomic(p, b"two!")
    assert open(p, "rb").read() == b"two!" and os.listdir(tmp_path / "d") == ["f.bin"]


def test_a_tampered_hub_json_is_refused_naming_it(models, tmp_path):
    model, _, _ = models
    from moepage.engine.checkpoint import open_checkpoint
    from moepage.paging.pread import CheckpointError

    with HubStandIn({"me/demo": model}) as hub:
        cmd = [sys.executable, "-c", "import sys; from moepage.server.model_source import resolve_lazy; "
               "print(resolve_lazy('me/demo'))"]
        r = subprocess.run(cmd, env=hub_env(hub, str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = r.stdout.strip().splitlines()[-1]
    assert open_checkpoint(d).experts.describe().startswith("Hub me/demo@")
    hub_json = os.path.join(d, "hub.json")
    lazy = json.load(open(hub_json))
    rel = "experts/L000/E0000.safetensors"
    lazy["experts"][rel][0][5] = lazy["files"]["model.safetensors"]["size"] + 4096  # past the end of the file
    with open(hub_json, "w") as f:
        json.dump(lazy, f)
    with pytest.raises(CheckpointError, match="hub.json.*do not fit the file"):
        open_checkpoint(d)


def test_publish_of_a_split_directory_checks_it_first(models, tmp_path):
    import shutil

    from moepage.surgery.publish import publish

    _, split, _ = models
    r = publish(split, "me/demo-split", dry_run=True)
    assert r["split"] and any(f.startswith("experts/") for f, _ in r["files"])
    broken = str(tmp_path / "split")
    shutil.copytree(split, broken)
    with open(os.path.join(broken, "experts", "L001", "E0003.safetensors"), "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff")
    with pytest.raises(ValueError, match="E0003.safetensors: sha256 mismatch"):
        publish(broken, "me/demo-split", dry_run=True)


def test_lazy_flags_fail_in_one_line_before_anything_loads(capsys, tmp_path):
    from moepage.cli import main

    assert main(["serve", "demo", "--disk-budget", "1GB", "--port", "0"]) == 2
    assert "--disk-budget sets the disk tier of --lazy" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--lazy", "--port", "0"]) == 2
    assert "--lazy takes a Hugging Face repo id" in capsys.readouterr().err
