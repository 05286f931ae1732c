"""The shipped demo model (moepage/demo_model/): small, documented, served by default, answers code with code.

The "code-looking" check: the greedy reply, split into words, contains at least MIN_PYTHON_WORDS distinct Python
keywords, builtins or `self` (e.g. def, return, if, import, self, len, None) as whole words, and at least one of the
punctuation marks a Python line is made of: `(`, `:` or `=`.
"""
from __future__ import annotations

import builtins
import json
import keyword
import os
import re

import httpx
import pytest

from moepage.demo import SHIPPED_DIR, demo_model_path

pytestmark = pytest.mark.skipif(not (SHIPPED_DIR / "config.json").exists(), reason="no trained demo model shipped")
PYTHON_WORDS = set(keyword.kwlist) | {n for n in dir(builtins) if not n.startswith("_")} | {"self"}
MIN_PYTHON_WORDS = 3
MAX_BYTES = 20_000_000


def python_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text) if w in PYTHON_WORDS}


def looks_like_python(text: str) -> bool:
    return len(python_words(text)) >= MIN_PYTHON_WORDS and any(c in text for c in "(:=")


def test_shipped_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert (SHIPPED_DIR / name).exists(), name
    assert os.path.getsize(SHIPPED_DIR / "model.safetensors") <= MAX_BYTES
    config = json.loads((SHIPPED_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["torch_dtype"] == "bfloat16"
    assert config["moepage_named_experts"]["code"] == 0
    card = (SHIPPED_DIR / "README.md").read_text()
    assert "scripts/train_demo.py" in card and "Perplexity" in card and "Routing accuracy" in card
    assert demo_model_path() == str(SHIPPED_DIR)


def test_check_itself():
    assert looks_like_python("def f(self):\n    return len(x)")
    assert not looks_like_python("The quick brown fox jumps over the lazy dog.")


@pytest.fixture(scope="module")
def demo_server():
    from moepage.engine.engine import Engine, EngineConfig
    from moepage.server.app import create_app
    from moepage.server.model_source import resolve_model
    from moepage.server.runner import BackgroundServer
    from moepage.server.settings import ServerSettings

    resolved = resolve_model(None)  # what `moepage serve` with no arguments serves
    assert resolved.path == str(SHIPPED_DIR)
    engine = Engine.load(EngineConfig(model=resolved.path, ctx_size=512, threads=1))
    try:
        with BackgroundServer(create_app(engine, ServerSettings(model_id=resolved.model_id))) as url:
            yield url
    finally:
        engine.close()


def test_served_chat_about_python_returns_code_looking_text(demo_server):
    body = {"model": "moepage-demo", "temperature": 0, "max_tokens": 60,
            "messages": [{"role": "user",
                          "content": "Write a Python function that reads a file and returns its lines."}]}
    r = httpx.post(f"{demo_server}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    assert looks_like_python(text), text


def test_served_completion_of_python_code_returns_code_looking_text(demo_server):
    body = {"model": "moepage-demo", "temperature": 0, "max_tokens": 60,
            "prompt": "import os\nimport sys\n\n\ndef main(argv):\n"}
    r = httpx.post(f"{demo_server}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert looks_like_python(text), text


def test_card_has_the_elastic_and_extraction_tables():
    """scripts/demo_tables.py: one table on the same held-out tokens for elastic modes and extracted models, with
    params / memory / tok/s for every row, the PNG it references, and the extraction table (issue 6)."""
    card = (SHIPPED_DIR / "README.md").read_text()
    assert "![perplexity per domain against memory and decode speed, per mode](elastic.png)" in card
    png = SHIPPED_DIR / "elastic.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 400_000
    section = card[card.index("## Elastic serving and extracted models"):card.index("## Extracting the code experts")]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    for needle in ("full: top-1", "shared expert only", "extracted code, N=1 of 4", "extracted code, N=2 of 4",
                   "extracted code, N=1, --dense", "dense base"):
        assert any(r.startswith(f"| {needle}") for r in rows), needle
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert len(cells) == 11 and " / " in cells[5] and cells[-1].isdigit(), r  # params, memory, tok/s filled
    extraction = card[card.index("## Extracting the code experts"):]
    assert "moepage extract moepage/demo_model" in extraction and "--dense" in extraction
