"""`moepage serve` plumbing without HTTP: model resolution, the demo model, FIM refusal, settings from flags."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moepage.cli import build_parser
from moepage.demo import DemoSpec, build_demo_model, demo_model_path
from moepage.engine.tokenizer import Tokenizer
from moepage.server.errors import APIError
from moepage.server.model_source import ModelNotFound, resolve_model
from moepage.server.prompts import completion_prompts


def test_local_dir_and_gguf_paths(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    r = resolve_model(str(d))
    assert (r.path, r.model_id, r.kind) == (str(d), "my-model", "dir")
    g = tmp_path / "qwen3-30b-a3b-Q4_K_M.gguf"
    g.write_bytes(b"GGUF")
    r = resolve_model(str(g))
    assert (r.path, r.model_id, r.kind) == (str(g), "qwen3-30b-a3b-Q4_K_M", "gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="must be a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelNotFound, match="no such model directory"):
        resolve_model(str(tmp_path / "missing"))


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFound) as e:
        resolve_model("nobody-here/no-such-moe")
    assert "nobody-here/no-such-moe" in str(e.value) and "local directory" in str(e.value)


def test_demo_model_is_built_once_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPAGE_CACHE", str(tmp_path / "cache"))
    spec = DemoSpec(layers=2, experts=4, vocab=300)
    path = demo_model_path(spec)
    assert path.startswith(str(tmp_path / "cache"))
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] == 4
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert demo_model_path(spec) == path and os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.engine.sampling import SamplingParams

    engine = Engine.load(EngineConfig(model=path, threads=1, ctx_size=64))
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    steps = list(engine.generate(ids, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    assert len(steps) == 3
    engine.close()


def test_demo_build_is_deterministic(tmp_path):
    spec = DemoSpec(layers=1, experts=2, vocab=300)
    a = build_demo_model(tmp_path / "a", spec)
    b = build_demo_model(tmp_path / "b", spec)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()


def test_suffix_refused_without_fim_tokens(tokenizer_dir):
    tk = Tokenizer.from_dir(str(tokenizer_dir))
    with pytest.raises(APIError) as e:
        completion_prompts(tk, "def f(", "return x", tk.vocab_size)
    assert e.value.status == 400 and e.value.code == "fim_not_supported" and e.value.param == "suffix"
    assert completion_prompts(tk, "def f(", None, tk.vocab_size) == [tk.encode("def f(")]


def test_serve_flags_to_settings(monkeypatch):
    from moepage.commands.serve import settings_from_args

    monkeypatch.delenv("MOEPAGE_API_KEY", raising=False)
    args = build_parser().parse_args(["serve", "some/model", "--cors", "http://a,http://b", "--api-key", "k",
                                      "--max-queue", "3", "--port", "9000"])
    s = settings_from_args(args, "some/model")
    assert (s.host, s.port, s.api_keys, s.cors_origins, s.max_queue) == ("127.0.0.1", 9000, ("k",),
                                                                          ["http://a", "http://b"], 3)
    monkeypatch.setenv("MOEPAGE_API_KEY", "env-key")
    assert settings_from_args(build_parser().parse_args(["serve"]), "x").api_keys == ("env-key",)


# ---- GGUF from the Hub, resolved offline from a real HF cache layout -------------------------------------
REV = "0123456789abcdef0123456789abcdef01234567"
GGUF_REPO_FILES = ["Qwen3-30B-A3B-Q4_K_M.gguf", "Qwen3-30B-A3B-Q4_K.gguf", "Qwen3-30B-A3B-Q8_0.gguf",
                   "mmproj-F16.gguf", "README.md", "UD/Qwen3-30B-A3B-UD-Q2_K_XL.gguf",
                   "BF16/Qwen3-30B-A3B-BF16-00001-of-00002.gguf", "BF16/Qwen3-30B-A3B-BF16-00002-of-00002.gguf"]


def hf_cache(root, repo_id: str, files: list[str]) -> str:
    """The huggingface_hub cache layout: models--owner--repo/{refs/main, blobs/<sha>, snapshots/<rev>/<file> -> blob}."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(REV)
    (repo_dir / "blobs").mkdir()
    for i, name in enumerate(files):
        blob = repo_dir / "blobs" / f"{i:040x}"
        blob.write_bytes(b"GGUF" + name.encode())
        link = repo_dir / "snapshots" / REV / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return str(repo_dir / "snapshots" / REV)


def resolve_offline(cache, spec: str) -> dict:
    """resolve_model in a fresh interpreter with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at the cache:
    huggingface_hub reads both at import, as it does under `moepage serve`."""
    code = ("import json, logging, sys\n"
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from moepage.server.model_source import ModelNotFound, resolve_model\n"
            "try:\n"
            "    r = resolve_model(sys.argv[1])\n"
            "    print(json.dumps({'path': r.path, 'model_id': r.model_id, 'kind': r.kind}))\n"
            "except ModelNotFound as e:\n"
            "    print(json.dumps({'error': str(e)}))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf-home"))
    out = subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) | {"log": out.stderr}


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    snap = hf_cache(cache, "someone/Qwen3-30B-A3B-GGUF", GGUF_REPO_FILES)
    hf_cache(cache, "someone/only-q8-GGUF", ["b-Q8_0.gguf", "a-Q6_K.gguf", "mmproj-a.gguf"])
    hf_cache(cache, "someone/safetensors-moe", ["config.json", "model.safetensors", "tokenizer.json"])
    return cache, snap


@pytest.mark.parametrize("spec, file", [
    ("someone/Qwen3-30B-A3B-GGUF:Q4_K_M", "Qwen3-30B-A3B-Q4_K_M.gguf"),
    ("someone/Qwen3-30B-A3B-GGUF:q8_0", "Qwen3-30B-A3B-Q8_0.gguf"),
    ("someone/Qwen3-30B-A3B-GGUF:Q4_K", "Qwen3-30B-A3B-Q4_K.gguf"),
    ("someone/Qwen3-30B-A3B-GGUF:UD-Q2_K_XL", "UD/Qwen3-30B-A3B-UD-Q2_K_XL.gguf"),
    ("someone/Qwen3-30B-A3B-GGUF/Qwen3-30B-A3B-Q8_0.gguf", "Qwen3-30B-A3B-Q8_0.gguf"),
    ("someone/Qwen3-30B-A3B-GGUF", "Qwen3-30B-A3B-Q4_K_M.gguf"),
])
def test_hub_gguf_resolves_one_file_from_the_cache(gguf_cache, spec, file):
    cache, snap = gguf_cache
    r = resolve_offline(cache, spec)
    assert r.get("error") is None, r
    assert (r["path"], r["model_id"], r["kind"]) == (os.path.join(snap, file), spec, "hub-gguf")
    assert open(r["path"], "rb").read() == b"GGUF" + file.encode()
    if ":" not in spec and not spec.endswith(".gguf"):
        assert "serving Qwen3-30B-A3B-Q4_K_M.gguf" in r["log"]


def test_hub_gguf_default_quant_falls_back_to_first_and_safetensors_repos_stay_snapshots(gguf_cache):
    cache, _ = gguf_cache
    r = resolve_offline(cache, "someone/only-q8-GGUF")
    assert r["path"].endswith("/a-Q6_K.gguf") and "serving a-Q6_K.gguf" in r["log"]
    r = resolve_offline(cache, "someone/safetensors-moe")
    assert r["kind"] == "hub" and os.path.isfile(os.path.join(r["path"], "config.json"))


@pytest.mark.parametrize("spec, message", [
    ("someone/Qwen3-30B-A3B-GGUF:Q5_K_M", "no .gguf file for quant 'Q5_K_M'; it has: "),
    ("someone/Qwen3-30B-A3B-GGUF:BF16", "is one of 2 parts of a split GGUF"),
    ("someone/Qwen3-30B-A3B-GGUF/Qwen3-30B-A3B-Q5_K_M.gguf", "not in the local Hugging Face cache"),
    ("someone/not-cached-GGUF:Q4_K_M", "cannot be listed"),
])
def test_hub_gguf_missing_file_is_a_clear_error(gguf_cache, spec, message):
    cache, _ = gguf_cache
    r = resolve_offline(cache, spec)
    assert message in r["error"] and spec.split(":")[0].split("/Qwen3-30B-A3B-Q")[0] in r["error"], r


def test_elastic_flags_turn_preload_off():
    """An approximate routing mode pages in only the experts it uses; exact routing preloads when all fit."""
    from moepage.cli import engine_config

    parser = build_parser()
    assert engine_config(parser.parse_args(["serve", "m"]), "m").preload is None
    assert engine_config(parser.parse_args(["serve", "m", "--shared-only"]), "m").preload is False
    assert engine_config(parser.parse_args(["generate", "--model", "m", "--experts-per-token", "1"]), "m").preload is False
