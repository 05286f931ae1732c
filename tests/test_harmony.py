"""The Harmony format (gpt-oss): the exact token sequences the format defines, detokenized token by token as the
server does, split into reasoning_content, tool_calls and content, the same streamed and whole; the published
gpt-oss template rendering reasoning_effort and past tool calls the parser reads back; and over HTTP with the openai
client, streamed and not, tool_choice included."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from moepage.demo import DemoSpec, build_demo_model
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from moepage.server.harmony import HarmonyParser, is_harmony
from moepage.server.reasoning import ReasoningDelta
from moepage.server.tool_choice import HARMONY, forced_prefix, template_tool_format
from moepage.server.tool_parsers import ContentDelta, ToolCallArguments
from harmony_support import SPECIAL, TEMPLATE, save_harmony_tokenizer
from server_support import MODEL_ID, ask_forced, assert_stream_protocol, serving

THOUGHT, ANSWER = "The user asks about the weather.", "It is sunny in Paris."
ARGS = '{"city":"Paris"}'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# What the model writes after the generation prompt `<|start|>assistant` (the stop token, <|return|> or <|call|>,
# is not part of the text the server sees).
SEQUENCES = {
    "reasoning_then_final": (
        f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>final<|message|>{ANSWER}",
        (THOUGHT, ANSWER, [])),
    "tool_call_constrained": (
        f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>commentary "
        f"to=functions.get_weather <|constrain|>json<|message|>{ARGS}",
        (THOUGHT, "", [("get_weather", ARGS)])),
    "recipient_before_channel": (  # the order the gpt-oss template renders past calls in
        f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant to=functions.get_weather"
        f"<|channel|>commentary json<|message|>{ARGS}",
        (THOUGHT, "", [("get_weather", ARGS)])),
    "preamble_then_two_calls": (
        f"<|channel|>commentary<|message|>Checking two cities.<|end|>"
        f"<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{ARGS}<|call|>"
        f"<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city":"Rome"}',
        ("", "Checking two cities.", [("get_weather", ARGS), ("get_weather", '{"city":"Rome"}')])),
    "final_only": (f"<|channel|>final<|message|>{ANSWER}<|return|>", ("", ANSWER, [])),
    "no_harmony_header": ("Plain text, no header.", ("", "Plain text, no header.", [])),
    "header_cut_off": (f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>fin",
                       (THOUGHT, "", [])),
    "end_left_out": (f"<|channel|>analysis<|message|>{THOUGHT}<|start|>assistant<|channel|>final<|message|>{ANSWER}",
                     (THOUGHT, ANSWER, [])),
}


def parse(pieces: list[str], tools=TOOLS):
    """(reasoning, content, [(name, arguments)], events) from feeding pieces one by one."""
    p, events = HarmonyParser(tools), []
    for piece in pieces:
        events += p.feed(piece)
    events += p.finish()
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert reasoning == (p.reasoning_text or "")
    assert_stream_protocol(events, p.calls)
    return reasoning, content, [(c.name, c.arguments) for c in p.calls], events


@pytest.fixture(scope="module")
def harmony_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("harmony_tokenizer")
    save_harmony_tokenizer(d)
    return Tokenizer.from_dir(str(d))


def token_pieces(tk: Tokenizer, text: str) -> list[str]:
    """text -> the deltas the server's detokenizer gives for its tokens, one token at a time."""
    ids = tk.encode(text, add_special_tokens=False)
    for marker in SPECIAL:
        if marker in text:
            assert tk.token_to_id(marker) in ids  # each marker is one special token, as in o200k_harmony
    detok = IncrementalDetokenizer(tk, tk.encode("<|start|>assistant", add_special_tokens=False))
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("name", SEQUENCES)
def test_token_sequences_parse_into_the_openai_fields(harmony_tokenizer, name):
    text, want = SEQUENCES[name]
    pieces = token_pieces(harmony_tokenizer, text)
    assert "".join(pieces) == text  # the markers survive the server's decode
    streamed = parse(pieces)[:3]
    assert streamed == want
    assert parse([text])[:3] == want  # whole text, as a non-streamed response is built


def test_special_tokens_other_than_markers_stay_hidden(harmony_tokenizer):
    ids = harmony_tokenizer.encode("<|endoftext|><|channel|>final<|message|>Hi", add_special_tokens=False)
    assert harmony_tokenizer.decode(ids) == "<|channel|>final<|message|>Hi"


@pytest.mark.parametrize("name", SEQUENCES)
@hsettings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=16))
def test_splitting_at_any_point_gives_the_whole_texts_fields(name, cuts):
    text, want = SEQUENCES[name]
    bounds = [0, *sorted({c for c in cuts if c <= len(text)}), len(text)]
    assert parse([text[a:b] for a, b in zip(bounds, bounds[1:])])[:3] == want


def test_without_tools_a_call_body_is_content():
    text = SEQUENCES["tool_call_constrained"][0]
    assert parse([text], tools=None)[:3] == (THOUGHT, ARGS, [])


def test_a_runaway_header_is_content():
    text = "<|channel|>" + "x" * 600
    assert parse([text])[:3] == ("", text, [])


# ---- the published template ----------------------------------------------------------------------------------
def test_the_gpt_oss_template_is_harmony_and_takes_reasoning_effort(harmony_tokenizer):
    assert is_harmony(TEMPLATE) and not is_harmony("{{ '<|im_start|>' }}")
    assert template_tool_format(TEMPLATE) == HARMONY
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    for effort in ("low", "medium", "high"):
        text = harmony_tokenizer.render_chat(msgs, reasoning_effort=effort)
        assert f"Reasoning: {effort}\n" in text and text.endswith("<|start|>assistant")
    assert "Reasoning: medium\n" in harmony_tokenizer.render_chat(msgs)


def test_a_past_call_the_template_renders_parses_back(harmony_tokenizer):
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny"}]
    text = harmony_tokenizer.render_chat(msgs, tools=TOOLS, add_generation_prompt=True)
    rendered = text[text.index("<|start|>assistant to=") + len("<|start|>assistant"): text.index("<|call|>")]
    assert parse(token_pieces(harmony_tokenizer, rendered))[2] == [("get_weather", '{"city": "Paris"}')]
    assert "namespace functions" in text and "type get_weather" in text


def test_forced_prefixes_parse_as_the_call_they_open():
    named = forced_prefix(HARMONY, "get_weather")
    assert parse([named + ARGS])[2] == [("get_weather", ARGS)]
    assert parse([forced_prefix(HARMONY, None) + "get_weather <|constrain|>json<|message|>" + ARGS])[2] == \
        [("get_weather", ARGS)]


# ---- over HTTP -------------------------------------------------------------------------------------------------
# Each forced piece is one added token, and no token may come twice (the forcing biases each token once), so the
# demo tokenizer gets whole headers as tokens: they decode to the text the markers spell.
OPEN_ANALYSIS = "<|channel|>analysis<|message|>"
TO_FINAL = "<|end|><|start|>assistant<|channel|>final<|message|>"
TO_CALL = "<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
PIECES = (OPEN_ANALYSIS, TO_FINAL, TO_CALL, THOUGHT, ANSWER, ARGS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = build_demo_model(tmp_path_factory.mktemp("harmony_http") / "m",
                            DemoSpec(layers=2, experts=8, vocab=400, lm_head_scale=1e-3, extra_tokens=PIECES))
    cfg_file = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_file.write_text(json.dumps(cfg))
    engine = Engine.load(EngineConfig(model=str(path), ctx_size=512, threads=1))
    with serving(engine) as (url, _):
        yield url, engine
    engine.close()


def ask(url, engine, pieces, stream: bool, **kw):
    return ask_forced(url, engine, pieces, stream, [{"role": "user", "content": "Weather in Paris?"}], **kw)


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_and_final_over_http(server, stream):
    url, engine = server
    got = ask(url, engine, [OPEN_ANALYSIS, THOUGHT, TO_FINAL, ANSWER], stream)
    assert got == (THOUGHT, ANSWER, [], "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_over_http(server, stream):
    url, engine = server
    reasoning, content, calls, finish = ask(url, engine, [OPEN_ANALYSIS, THOUGHT, TO_CALL, ARGS], stream, tools=TOOLS)
    assert (reasoning, content, calls, finish) == (THOUGHT, None, [("get_weather", ARGS)], "tool_calls")


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_forces_the_harmony_call(server, stream):
    url, engine = server
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reasoning, content, calls, finish = ask(url, engine, [ARGS], stream, tools=TOOLS, tool_choice=choice)
    assert (reasoning, content, calls, finish) == (None, None, [("get_weather", ARGS)], "tool_calls")
