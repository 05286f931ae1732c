"""Context discovery: /v1/models entries carry the served context (context_length, max_model_len, meta.n_ctx_train),
GET /props answers as llama-server's does, and `moepage serve` warns when --ctx-size passes the trained length."""
from __future__ import annotations

import httpx
import openai
import pytest

from moepage.cli import build_parser
from moepage.commands.serve import prompt_cache_line
from moepage.paging.budget import human
from moepage.server.discovery import context_warning, template_caps
from server_support import MODEL_ID, SMALL, ServeProcess, load_engine, serving, small_demo

QWEN3_TEMPLATE_PARTS = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{ tool | tojson }}{%- endfor %}"
    "{%- for message in messages %}{%- if message.role == 'system' %}{%- elif message.role == 'assistant' %}"
    "{%- if message.reasoning_content is string %}{% set reasoning_content = message.reasoning_content %}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{{ tool_call.name }}{%- endfor %}"
    "{%- elif message.role == 'tool' %}<tool_response>{%- endif %}{%- endfor %}"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\\n\\n</think>{%- endif %}"
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("props"))


@pytest.fixture(scope="module")
def engine(demo):
    e = load_engine(demo, ctx=1024, prefix_cache=True)
    yield e
    e.close()


def test_models_carry_the_served_and_trained_context(engine):
    with serving(engine) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)
        card = client.models.list().data[0]
        extra = card.model_extra
        assert card.id == MODEL_ID
        assert extra["context_length"] == extra["max_model_len"] == 1024
        assert extra["meta"]["n_ctx_train"] == SMALL.max_position and extra["meta"]["n_ctx"] == 1024
        assert client.models.retrieve(MODEL_ID).model_extra["context_length"] == 1024


def test_props_answers_as_llama_server(engine):
    with serving(engine) as (url, _):
        p = httpx.get(url + "/props", timeout=10).json()
    assert p["n_ctx"] == p["default_generation_settings"]["n_ctx"] == 1024
    assert p["total_slots"] == 1 and p["model_alias"] == MODEL_ID and p["model_path"] == MODEL_ID
    assert p["default_generation_settings"]["params"]["cache_prompt"] is True
    assert p["chat_template"] == engine.tokenizer.chat_template
    caps = p["chat_template_caps"]
    assert caps["supports_tools"] and caps["supports_tool_calls"] and caps["supports_tool_responses"]
    assert caps["supports_system_role"] and caps["supports_parallel_tool_calls"]
    assert not caps["supports_thinking"] and not caps["supports_preserve_reasoning"]
    assert p["eos_token"] == engine.tokenizer.eos_token and p["modalities"] == {"vision": False, "audio": False}


def test_props_is_behind_the_api_key(engine):
    with serving(engine, api_keys=("k",)) as (url, _):
        assert httpx.get(url + "/props", timeout=10).status_code == 401
        r = httpx.get(url + "/props", headers={"Authorization": "Bearer k"}, timeout=10)
        assert r.status_code == 200 and r.json()["n_ctx"] == 1024


def test_template_caps_of_a_thinking_template():
    caps = template_caps(QWEN3_TEMPLATE_PARTS)
    assert caps["supports_thinking"] and caps["supports_enable_thinking"] and caps["supports_preserve_reasoning"]
    assert caps["supports_tools"] and caps["supports_parallel_tool_calls"] and not caps["supports_tool_call_id"]
    assert not any(template_caps(None).values())


def test_ctx_size_past_the_trained_length_warns():
    assert context_warning(None, 4096) is None and context_warning(4096, 4096) is None
    line = context_warning(8192, 4096)
    assert "--ctx-size 8192" in line and "max_position_embeddings 4096" in line


def test_serve_starts_with_the_prompt_cache_and_warns_past_the_trained_context(demo, engine):
    assert build_parser().parse_args(["serve", "--no-prompt-cache"]).no_prompt_cache
    assert build_parser().parse_args(["serve", "--prompt-cache-bytes", "64MiB"]).prompt_cache_bytes == 64 << 20
    assert prompt_cache_line(engine).startswith(f"prompt cache: {human(engine.plan.kv_bytes)} ")
    p = ServeProcess([demo, "--ctx-size", str(2 * SMALL.max_position), "--threads", "1"])
    with p:
        props = httpx.get(p.url + "/props", timeout=10).json()
    log = p.proc.stderr.read()
    assert props["n_ctx"] == 2 * SMALL.max_position and props["default_generation_settings"]["params"]["cache_prompt"]
    assert f"--ctx-size {2 * SMALL.max_position} is above the model's max_position_embeddings" in log
    assert "prompt cache: " in log and "(--prompt-cache-bytes)" in log
