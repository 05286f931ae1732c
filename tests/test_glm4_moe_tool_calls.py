"""GLM-4.5's tool-call format `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>`: parsed
whole and piece by piece to the same calls, values converted by the tool's schema, the calls GLM-4.6's own chat
template renders parsed back to themselves, the format picked from the template, and served over HTTP by a
glm4_moe model with that template (streamed and not, a named tool_choice forcing the call's opening)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from family_support import serving_chat_model
from glm4_support import CHAT_TEMPLATE, glm_tokenizer, save_glm4_moe
from moepage.engine.chat_template import BoundedSandbox
from moepage.server.tool_choice import GLM_XML, forced_prefix, template_tool_format
from moepage.server.tool_parsers import ContentDelta, ToolCallParser, parse_all
from qwen35_support import one_torch_thread  # noqa: F401 (autouse: one thread here)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "zip": {"type": "string"}, "where": {"type": "object"}}}}},
         {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]
GLM46 = ("Let me look.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>São Paulo</arg_value>\n"
         "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>metric</arg_key>\n<arg_value>true</arg_value>\n"
         "<arg_key>zip</arg_key>\n<arg_value>01000</arg_value>\n<arg_key>where</arg_key>\n"
         '<arg_value>{"lat": 1.5, "tags": ["a", "}"]}</arg_value>\n</tool_call>\n<tool_call>noop\n</tool_call>')
GLM47 = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
WANT46 = [("get_weather", {"city": "São Paulo", "days": 3, "metric": True, "zip": "01000",
                           "where": {"lat": 1.5, "tags": ["a", "}"]}}), ("noop", {})]


def feed(text: str, cuts, formats=("hermes", "qwen3_coder", "mistral", "glm")):
    parser = ToolCallParser(TOOLS, formats)
    events, last = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        events += parser.feed(text[last:cut])
        last = cut
    events += parser.finish()
    return "".join(e.text for e in events if isinstance(e, ContentDelta)), parser.calls


@pytest.mark.parametrize("text, content, want", [(GLM46, "Let me look.\n", WANT46),
                                                 (GLM47, None, [("get_weather", {"city": "Paris"})])])
def test_whole_and_char_by_char_give_the_same_calls(text, content, want):
    got_content, calls = parse_all(text, TOOLS)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want
    streamed, scalls = feed(text, range(len(text)))
    assert [(c.name, c.arguments) for c in scalls] == [(c.name, c.arguments) for c in calls]
    assert streamed.strip() == (content or "").strip()
    assert not any(tag in streamed for tag in ("<tool_call", "<arg_", "</arg"))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, len(GLM46)), max_size=12))
def test_any_chunking_gives_the_same_calls(cuts):
    _, calls = feed(GLM46, cuts)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == WANT46


def test_arguments_stream_as_each_value_closes():
    parser = ToolCallParser(TOOLS)
    head = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>"
    events = parser.feed(head)
    assert [type(e).__name__ for e in events] == ["ToolCallStart", "ToolCallArguments"]
    assert events[1].delta == '{"city": "Paris"'
    assert parser.feed("\n<arg_key>days</arg_key>\n<arg_value>1") == []  # the value is still open
    assert [e.delta for e in parser.feed("2</arg_value>\n</tool_call>")] == [', "days": 12', "}"]


def test_not_a_glm_body_stays_text_and_other_formats_still_parse():
    assert parse_all("<tool_call>{bad</tool_call>", TOOLS, ("glm",)) == ("<tool_call>{bad</tool_call>", [])
    assert parse_all("<tool_call>two words\n</tool_call>", TOOLS)[1] == []
    content, [call] = parse_all('<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>', TOOLS)
    assert call.name == "noop" and content is None


def render(messages, tools=None, **kw) -> str:
    sandbox = BoundedSandbox(CHAT_TEMPLATE.read_text())
    return sandbox.render(sandbox.from_string(CHAT_TEMPLATE.read_text()), None, messages=messages, tools=tools,
                          add_generation_prompt=False, **kw)


def test_glm_template_calls_parse_back_to_themselves():
    """GLM-4.6's template writes past calls in the format the model is taught; the parser reads them back."""
    calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in WANT46]
    text = render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Let me look.",
                                                       "tool_calls": calls}], TOOLS)
    reply = text.split("<|assistant|>", 1)[1].split("</think>", 1)[1]
    content, got = parse_all(reply, TOOLS)
    assert content.strip() == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in got] == WANT46


def test_format_and_forced_prefix_from_the_template():
    assert template_tool_format(CHAT_TEMPLATE.read_text()) == GLM_XML
    assert template_tool_format(None, "glm") == GLM_XML
    prefix = forced_prefix(GLM_XML, "get_weather")
    assert prefix == "<tool_call>get_weather\n"
    _, [call] = parse_all(prefix + "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>", TOOLS)
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"days": 2})


@pytest.fixture(scope="module")
def glm_server(tmp_path_factory, tokenizer_dir):
    with serving_chat_model(tmp_path_factory.mktemp("glm-http"), tokenizer_dir, glm_tokenizer, save_glm4_moe,
                            2048) as served:
        yield served


def test_served_over_http_streamed_and_not(glm_server):
    import httpx

    from test_server import forced

    engine, url = glm_server
    rest = "<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
    body = {"model": "hardening-test", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, **forced(engine, rest)}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and not choice["message"]["content"]
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert deltas[0]["function"]["name"] == "get_weather"
    assert "".join(d["function"].get("arguments") or "" for d in deltas) == call["function"]["arguments"]
    assert not "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
