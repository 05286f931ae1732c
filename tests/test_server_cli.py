"""`moepage serve` plumbing without HTTP: model resolution, the demo model, FIM refusal, settings from flags."""
from __future__ import annotations

import json
import os

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
