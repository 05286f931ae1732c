"""Tool calls as agents meet them: text before the call, several calls in one turn (parallel_tool_calls),
Qwen3-Coder XML with multi-line and schema-typed values (with or without the <tool_call> wrapper and a parameter's
closing tag), and a call split across stream chunks at any byte. Parser alone, then over HTTP with openai."""
from __future__ import annotations

import codecs
import json

import openai
import pytest
from hypothesis import given, settings, strategies as st

from moepage.demo import DemoSpec, build_demo_model
from moepage.engine.engine import Engine, EngineConfig
from moepage.server.tool_parsers import ContentDelta, ToolCallParser, parse_all
from server_support import MODEL_ID, assert_stream_protocol, serving

SCHEMA = {"type": "object", "properties": {
    "path": {"type": "string"}, "content": {"type": "string"}, "line": {"type": "integer"},
    "ratio": {"type": "number"}, "replace_all": {"type": "boolean"}, "edits": {"type": "array"},
    "options": {"type": "object"}, "limit": {"type": ["integer", "null"]}, "mode": {"enum": ["123", "x"]},
    "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": SCHEMA}} for n in ("read", "edit")]
CODE = 'def f():\n    return {"a": 1}\n\n# café ☕'

BEFORE = ("I'll read both files first.\n\n<tool_call>\n{\"name\": \"read\", \"arguments\": {\"path\": \"a.py\"}}\n"
          "</tool_call>\n<tool_call>\n{\"name\": \"read\", \"arguments\": {\"path\": \"b/ü.py\"}}\n</tool_call>")
XML = ("Editing.\n<tool_call>\n<function=edit>\n<parameter=path>\nsrc/a.py\n</parameter>\n<parameter=content>\n"
       f"{CODE}\n</parameter>\n<parameter=line>\n3\n</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n"
       "<parameter=replace_all>\nTrue\n</parameter>\n<parameter=edits>\n[{\"old\": \"a\", \"new\": \"b\"}]\n"
       "</parameter>\n<parameter=options>\n{\"dry\": false}\n</parameter>\n<parameter=limit>\nnull\n</parameter>\n"
       "<parameter=mode>\n123\n</parameter>\n<parameter=note>\n42\n</parameter>\n</function>\n</tool_call>")
XML_ARGS = {"path": "src/a.py", "content": CODE, "line": 3, "ratio": 0.5, "replace_all": True,
            "edits": [{"old": "a", "new": "b"}], "options": {"dry": False}, "limit": None, "mode": "123", "note": "42"}
# no <tool_call> wrapper, a parameter's closing tag left out, two calls in one turn
BARE = ("<function=read>\n<parameter=path>\nx.py\n<parameter=line>\n7\n</parameter>\n</function>\n"
        "<function=read>\n<parameter=path>\ny.py\n</function>")

CASES = {
    BEFORE: ("I'll read both files first.\n\n", [("read", {"path": "a.py"}), ("read", {"path": "b/ü.py"})]),
    XML: ("Editing.\n", [("edit", XML_ARGS)]),
    BARE: (None, [("read", {"path": "x.py", "line": 7}), ("read", {"path": "y.py"})]),
}


@pytest.mark.parametrize("text", list(CASES), ids=["text-before", "xml-typed", "bare-xml"])
def test_whole_text_parses_to_the_calls(text):
    content, calls = parse_all(text, TOOLS)
    assert (content, [(c.name, json.loads(c.arguments)) for c in calls]) == CASES[text]


def stream_bytes(data: bytes, cuts: list[int]):
    """The text as the detokenizer hands it on: bytes cut anywhere, incomplete characters held back."""
    parser, decoder, events, last = ToolCallParser(TOOLS), codecs.getincrementaldecoder("utf-8")(), [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        events += parser.feed(decoder.decode(data[last:cut]))
        last = cut
    events += parser.feed(decoder.decode(b"", final=True)) + parser.finish()
    return events, parser.calls


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_call_split_at_any_bytes_gives_the_same_calls_and_no_tag_text(data):
    text = data.draw(st.sampled_from(list(CASES)))
    raw = text.encode()
    events, calls = stream_bytes(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    want_content, want_calls = CASES[text]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want_calls
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert content.strip() == (want_content or "").strip()
    assert_stream_protocol(events, calls)


def test_every_single_split_point():
    for text in CASES:
        raw = text.encode()
        for cut in range(len(raw) + 1):
            _, calls = stream_bytes(raw, [cut])
            assert [(c.name, json.loads(c.arguments)) for c in calls] == CASES[text][1], (text[:20], cut)


# ---- over HTTP -----------------------------------------------------------------------------------------------
PREAMBLE = "I'll read both files first."
CALL_A = '<tool_call>\n{"name": "read", "arguments": {"path": "a.py"}}\n</tool_call>'
CALL_B = '<tool_call>\n{"name": "read", "arguments": {"path": "b.py"}}\n</tool_call>'
XML_PIECES = ("<tool_call>\n<function=edit>\n<parameter=path>\nsrc/a.py\n</parameter>\n<parameter=content>\n",
              f"{CODE}\n</parameter>\n<parameter=line>\n3\n", "</parameter>\n</function>\n</tool_call>")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    spec = DemoSpec(layers=2, experts=8, vocab=400, lm_head_scale=1e-3,
                    extra_tokens=(PREAMBLE, CALL_A, CALL_B) + XML_PIECES)
    engine = Engine.load(EngineConfig(model=build_demo_model(tmp_path_factory.mktemp("agents"), spec), ctx_size=2048,
                                      threads=1))
    with serving(engine) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30), engine
    engine.close()


def forced(engine, pieces) -> dict:
    ids = [engine.tokenizer.token_to_id(p) for p in pieces] + [engine.tokenizer.eos_id]
    assert None not in ids
    step = 3.0 / max(1, len(ids) - 1)
    return dict(temperature=0, presence_penalty=2, frequency_penalty=2, max_tokens=len(ids) + 3,
                logit_bias={str(t): 100.0 - i * step for i, t in enumerate(ids)})


def ask(client, engine, pieces, stream, **kw):
    body = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Read a.py and b.py"}], tools=TOOLS,
                **forced(engine, pieces), **kw)
    if not stream:
        r = client.chat.completions.create(**body)
        m = r.choices[0].message
        return m.content, [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []], \
            r.choices[0].finish_reason
    chunks = [c for c in client.chat.completions.create(**body, stream=True) if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks) or None
    calls: dict[int, list] = {}
    for c in chunks:
        for t in c.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(t.index, [None, ""])
            entry[0] = entry[0] or t.function.name
            entry[1] += t.function.arguments or ""
    finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    return content, [(n, json.loads(a)) for n, a in (calls[i] for i in sorted(calls))], finish[-1]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parallel", [None, True, False])
def test_text_before_calls_and_parallel_tool_calls(served, stream, parallel):
    client, engine = served
    kw = {} if parallel is None else {"parallel_tool_calls": parallel}
    content, calls, finish = ask(client, engine, [PREAMBLE, CALL_A, CALL_B], stream, **kw)
    both = [("read", {"path": "a.py"}), ("read", {"path": "b.py"})]
    assert content.strip() == PREAMBLE and finish == "tool_calls"
    assert calls == (both[:1] if parallel is False else both)


@pytest.mark.parametrize("stream", [False, True])
def test_qwen3_coder_xml_values_typed_by_the_schema(served, stream):
    client, engine = served
    content, calls, finish = ask(client, engine, list(XML_PIECES), stream)
    assert not content and finish == "tool_calls"
    assert calls == [("edit", {"path": "src/a.py", "content": CODE, "line": 3})]


def test_a_deeply_nested_schema_is_looked_into_only_so_far():
    schema = {"type": "integer"}
    for _ in range(5000):  # a request's tool schema: far deeper than Python's recursion limit
        schema = {"anyOf": [schema]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"n": schema}}}}]
    _, calls = parse_all("<function=f>\n<parameter=n>\n5\n</parameter>\n</function>", tools)
    assert json.loads(calls[0].arguments) == {"n": 5}  # undeclared as far as looked: parsed where it is JSON
