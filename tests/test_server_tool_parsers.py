"""Tool-call parsers: the same calls whether fed whole or piece by piece, and no tag text in content."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from moepage.server.tool_choice import forced_prefix, template_tool_format
from moepage.server.tool_parsers import (
    ContentDelta, ToolCallArguments, ToolCallParser, parse_all,
)
from moepage.surgery.tokenizer_builder import CHATML_TEMPLATE
from server_support import assert_stream_protocol

TOOLS = [{"type": "function", "function": {"name": "run", "parameters": {"type": "object", "properties": {
    "cmd": {"type": "string"}, "n": {"type": "integer"}, "opts": {"type": "object"}}}}}]

HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "when": {"day": 1}}}\n'
          '</tool_call>\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>')
QWEN3_CODER = ("<tool_call>\n<function=run>\n<parameter=cmd>\nls -la | grep '}'\n</parameter>\n<parameter=n>\n3\n"
               "</parameter>\n<parameter=opts>\n{\"a\": [1, 2]}\n</parameter>\n</function>\n</tool_call>")
MISTRAL_ARRAY = 'ok [TOOL_CALLS][{"name": "a", "arguments": {"x": "]"}}, {"name": "b", "arguments": {}}]'
MISTRAL_ARGS = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]noop[ARGS]{}'

EXPECTED = {
    HERMES: ("Let me check.\n", [("get_weather", {"city": "Paris", "when": {"day": 1}}), ("noop", {})]),
    QWEN3_CODER: (None, [("run", {"cmd": "ls -la | grep '}'", "n": 3, "opts": {"a": [1, 2]}})]),
    MISTRAL_ARRAY: ("ok ", [("a", {"x": "]"}), ("b", {})]),
    MISTRAL_ARGS: (None, [("get_weather", {"city": "Paris"}), ("noop", {})]),
}


def run_stream(text: str, cuts: list[int], tools=TOOLS):
    parser = ToolCallParser(tools)
    events, last = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        events += parser.feed(text[last:cut])
        last = cut
    return events + parser.finish(), parser.calls


@pytest.mark.parametrize("text", list(EXPECTED))
def test_whole_text(text):
    content, calls = parse_all(text, TOOLS)
    want_content, want_calls = EXPECTED[text]
    assert content == want_content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want_calls


@pytest.mark.parametrize("text", list(EXPECTED))
def test_char_by_char_equals_whole(text):
    events, calls = run_stream(text, list(range(len(text))))
    whole_content, whole_calls = parse_all(text, TOOLS)
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert content.strip() == (whole_content or "").strip()
    for tag in ("<tool_call", "</tool_call", "<function", "<parameter", "[TOOL_CALLS", "[ARGS"):
        assert tag not in content


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_chunking_gives_same_calls(data):
    text = data.draw(st.sampled_from(list(EXPECTED)))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    events, calls = run_stream(text, cuts)
    _, want = EXPECTED[text]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want
    assert_stream_protocol(events, calls)


def test_arguments_stream_incrementally():
    parser = ToolCallParser(TOOLS)
    parser.feed('<tool_call>{"name": "run", "arguments": {"cmd": "ec')
    events = parser.feed('ho hi", "n": 2}}')
    assert any(isinstance(e, ToolCallArguments) and "ho hi" in e.delta for e in events)
    events = parser.feed("</tool_call>") + parser.finish()
    assert json.loads(parser.calls[0].arguments) == {"cmd": "echo hi", "n": 2}


def test_partial_tag_is_held_back_then_released_as_text():
    parser = ToolCallParser(TOOLS)
    assert parser.feed("a <tool") == [ContentDelta("a ")]
    assert parser.feed("box> b") == [ContentDelta("<toolbox> b")]
    assert parser.feed("[TOOL_") == []
    assert parser.finish() == [ContentDelta("[TOOL_")]


def test_invalid_block_falls_back_to_content():
    content, calls = parse_all("x <tool_call>not json</tool_call> y", TOOLS)
    assert calls == [] and content == "x <tool_call>not json</tool_call> y"


def test_arguments_before_name_parsed_at_close():
    content, calls = parse_all('<tool_call>{"arguments": {"q": 1}, "name": "search"}</tool_call>')
    assert content is None and calls[0].name == "search" and json.loads(calls[0].arguments) == {"q": 1}


def test_unclosed_hermes_block_at_end_still_yields_call():
    content, calls = parse_all('<tool_call>\n{"name": "noop", "arguments": {"a": 1}}\n')
    assert content is None and json.loads(calls[0].arguments) == {"a": 1}


def test_mistral_ids_are_nine_alphanumerics():
    _, calls = parse_all(MISTRAL_ARGS)
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)


def test_formats_can_be_restricted():
    content, calls = parse_all(MISTRAL_ARGS, formats=("hermes",))
    assert calls == [] and content == MISTRAL_ARGS
    with pytest.raises(ValueError):
        ToolCallParser(None, ("llama",))


@pytest.mark.parametrize("cuts", [[], "each"])
def test_hermes_arguments_given_as_a_json_string_are_not_double_encoded(cuts):
    text = '<tool_call>{"name": "run", "arguments": "{\\"cmd\\": \\"ls\\"}"}</tool_call>'
    _, calls = run_stream(text, list(range(len(text))) if cuts == "each" else [])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("run", {"cmd": "ls"})]


@pytest.mark.parametrize("cuts", [[], "each"])
def test_hermes_keys_after_arguments_do_not_leak_into_them(cuts):
    text = '<tool_call>{"name": "run", "arguments": {"cmd": "a}b", "opts": {"x": [1]}}, "id": "abc"}</tool_call>'
    _, calls = run_stream(text, list(range(len(text))) if cuts == "each" else [])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("run", {"cmd": "a}b", "opts": {"x": [1]}})]


# ---- tool_choice: the template's format and the forced prefix -------------------------------------------

# Shortened from the Qwen3-Coder template's tool instructions and its rendering of past calls.
QWEN3_CODER_TEMPLATE = ("{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}{%- for k, v in args %}"
                        "{{- '<parameter=' + k + '>\\n' }}{{- v }}{{- '\\n</parameter>\\n' }}{%- endfor %}"
                        "{{- '</function>\\n</tool_call>' }}")
MISTRAL_V11_TEMPLATE = "{{- '[TOOL_CALLS]' + tc.function.name + '[ARGS]' + tc.function.arguments|tojson }}"
MISTRAL_V3_TEMPLATE = "{{- '[TOOL_CALLS] [' }}{%- for tc in message.tool_calls %}{{- tc|tojson }}{%- endfor %}"


@pytest.mark.parametrize("template, configured, fmt", [
    (CHATML_TEMPLATE, "auto", "hermes"),
    (QWEN3_CODER_TEMPLATE, "auto", "qwen3_coder"),
    (QWEN3_CODER_TEMPLATE, "hermes", "qwen3_coder"),
    (MISTRAL_V11_TEMPLATE, "auto", "mistral_args"),
    (MISTRAL_V3_TEMPLATE, "auto", "mistral"),
    ("{{ messages[0].content }}", "auto", None),
    ("{{ messages[0].content }}", "hermes", "hermes"),
    (None, "qwen3_coder", "qwen3_coder"),
])
def test_tool_format_from_template(template, configured, fmt):
    assert template_tool_format(template, configured) == fmt


@pytest.mark.parametrize("fmt, rest", [
    ("hermes", '{"cmd": "ls", "n": 2}}\n</tool_call>'),
    ("qwen3_coder", "<parameter=cmd>\nls\n</parameter>\n<parameter=n>\n2\n</parameter>\n</function>\n</tool_call>"),
    ("mistral_args", '{"cmd": "ls", "n": 2}'),
    ("mistral", '{"cmd": "ls", "n": 2}}]'),
])
def test_named_prefix_plus_model_output_parses_to_that_call(fmt, rest):
    prefix = forced_prefix(fmt, "run")
    content, calls = parse_all(prefix + rest, TOOLS)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("run", {"cmd": "ls", "n": 2})]
    opening = forced_prefix(fmt, None)
    assert prefix.startswith(opening) and opening in ("<tool_call>\n", "[TOOL_CALLS]")
