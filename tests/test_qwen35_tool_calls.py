"""Qwen3.5's chat template from the checkpoint (llama.cpp's copy of it) through the server: thinking on by default,
and the Qwen3-Coder XML tool-call format (`<tool_call>\\n<function=NAME>\\n<parameter=P>V</parameter>...`) the
template teaches, picked from the template and parsed into OpenAI tool calls, streamed and not, by a qwen3_5_moe
model in the published layout (a named tool_choice forcing the call's opening, the rest forced by logit_bias)."""
from __future__ import annotations

import json

import httpx
import pytest

from family_support import serving_chat_model
from moepage.server.tool_choice import QWEN3_CODER_XML, forced_prefix, template_tool_format
from qwen35_support import CHAT_TEMPLATE, qwen35_tokenizer, save_qwen35
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer_dir):
    with serving_chat_model(tmp_path_factory.mktemp("qwen35-tools"), tokenizer_dir, qwen35_tokenizer, save_qwen35,
                            4096) as served:
        yield served


def test_the_template_picks_the_xml_format():
    assert template_tool_format(CHAT_TEMPLATE.read_text()) == QWEN3_CODER_XML
    assert forced_prefix(QWEN3_CODER_XML, "get_weather") == "<tool_call>\n<function=get_weather>\n"


def test_thinking_is_on_by_default(server):
    engine, url = server
    r = httpx.post(f"{url}/tokenize", json={"model": "hardening-test", "messages": [{"role": "user", "content": "hi"}]},
                   timeout=60)
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    tail = engine.tokenizer.encode("<|im_start|>assistant\n<think>\n")
    assert ids[-len(tail):] == tail and engine.tokenizer.decode(ids).endswith("assistant\n<think>\n")


@pytest.mark.parametrize("stream", [False, True])
def test_xml_tool_call_served_over_http(server, stream):
    from server_support import ask_forced

    engine, url = server
    rest = "<parameter=city>Paris</parameter></function></tool_call>"
    pieces = [engine.tokenizer.id_to_token(i) for i in engine.tokenizer.encode(rest)]
    reasoning, content, calls, finish = ask_forced(
        url, engine, pieces, stream, [{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert finish == "tool_calls" and not content and not reasoning
    [(name, arguments)] = calls
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}
