"""Reasoning output: <think>...</think> to reasoning_content (streamed as delta.reasoning_content) for templates
where the model opens <think> and for those whose generation prompt opens it; thinking turned off by
chat_template_kwargs.enable_thinking and reasoning_effort "none"; reasoning_content fed back to the template; tool
calls inside and after the reasoning still parse. Over real HTTP with the openai client."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from moepage.demo import DemoSpec, build_demo_model
from moepage.engine.engine import Engine, EngineConfig
from moepage.server.reasoning import ReasoningDelta, ReasoningSplitter, TextDelta
from server_support import MODEL_ID, ask_forced, serving

THOUGHT, ANSWER = "Thinking it over.", "It is sunny."
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
PIECES = ("<think>", "</think>", "<tool_call>", "</tool_call>", THOUGHT, ANSWER, CALL)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]

CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
          "{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}"
          "{%- endif %}{{- (message.content or '') + '<|im_end|>\\n' }}{%- endfor %}")
# Qwen3 hybrid: the model opens <think>; enable_thinking false puts an empty block in the prompt.
MODEL_OPENS = CHATML + ("{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                        "{%- if enable_thinking is defined and enable_thinking is false %}"
                        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
# Qwen3.5/3.6, Qwen3-thinking: the generation prompt opens <think>.
PROMPT_OPENS = CHATML + ("{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}"
                         "{%- if enable_thinking is defined and enable_thinking is false %}"
                         "{{- '\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
# a template that opens <think> whatever it is told
ALWAYS_OPENS = CHATML + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"


# ---- the splitter alone ------------------------------------------------------------------------------------
def split(text: str, cuts: list[int], **kw) -> tuple[str, str]:
    s, events, last = ReasoningSplitter(**kw), [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        events += s.feed(text[last:c])
        last = c
    events += s.finish()
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert reasoning == (s.reasoning_text or "")
    return reasoning, "".join(e.text for e in events if isinstance(e, TextDelta))


CASES = [
    ("<think>\nA thought.\n</think>\n\nThe answer.", {}, ("A thought.", "The answer.")),
    ("A thought.\n</think>\n\nThe answer.", {"in_reasoning": True}, ("A thought.", "The answer.")),
    ("\n<think>A</think><tool_call>{}</tool_call>", {}, ("A", "<tool_call>{}</tool_call>")),
    ("A<tool_call>{}</tool_call>", {"in_reasoning": True}, ("A", "<tool_call>{}</tool_call>")),
    ("A<function=f></function>", {"in_reasoning": True}, ("A", "<function=f></function>")),
    ("Plain <think> text", {}, ("", "Plain <think> text")),
    ("<thin", {}, ("", "<thin")),
    ("A\n\nB\n", {"in_reasoning": True}, ("A\n\nB", "")),
]


@pytest.mark.parametrize("text, kw, want", CASES)
@hsettings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 60), max_size=12))
def test_splitting_at_any_point_gives_the_whole_texts_parts(text, kw, want, cuts):
    assert split(text, [c for c in cuts if c <= len(text)], **kw) == want


# ---- over HTTP -----------------------------------------------------------------------------------------------
def model_with_template(root: Path, name: str, template: str) -> str:
    path = Path(build_demo_model(root / name, DemoSpec(layers=2, experts=8, vocab=400, lm_head_scale=1e-3,
                                                       extra_tokens=PIECES)))
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = template
    cfg_file.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("reasoning")
    engines = {name: Engine.load(EngineConfig(model=model_with_template(root, name, t), ctx_size=256, threads=1))
               for name, t in (("model_opens", MODEL_OPENS), ("prompt_opens", PROMPT_OPENS),
                               ("always_opens", ALWAYS_OPENS))}
    with serving(engines["model_opens"]) as (a, _), serving(engines["prompt_opens"]) as (b, _), \
            serving(engines["always_opens"]) as (c, _):
        yield {"model_opens": (a, engines["model_opens"]), "prompt_opens": (b, engines["prompt_opens"]),
               "always_opens": (c, engines["always_opens"])}
    for e in engines.values():
        e.close()


def ask(url, engine, pieces, stream: bool, **kw):
    return ask_forced(url, engine, pieces, stream, USER, **kw)


STYLES = {"model_opens": ["<think>", THOUGHT, "</think>"], "prompt_opens": [THOUGHT, "</think>"]}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_goes_to_reasoning_content(servers, style, stream):
    url, engine = servers[style]
    reasoning, content, _, finish = ask(url, engine, STYLES[style] + [ANSWER], stream)
    assert (reasoning, content, finish) == (THOUGHT, ANSWER, "stop")


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("inside", [False, True])
def test_tool_calls_inside_and_after_reasoning_parse(servers, style, stream, inside):
    url, engine = servers[style]
    thinking = STYLES[style][:-1] if inside else STYLES[style]  # inside: the call cuts the reasoning short
    reasoning, content, calls, finish = ask(url, engine, thinking + ["<tool_call>", CALL, "</tool_call>"], stream,
                                            tools=TOOLS)
    assert reasoning == THOUGHT and not content and finish == "tool_calls"
    assert len(calls) == 1 and calls[0][0] == "get_weather" and json.loads(calls[0][1]) == {"city": "Paris"}


@pytest.mark.parametrize("style", ["model_opens", "prompt_opens", "always_opens"])
@pytest.mark.parametrize("off", [{"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
                                 {"reasoning_effort": "none"}], ids=["enable_thinking", "reasoning_effort"])
@pytest.mark.parametrize("stream", [False, True])
def test_thinking_off_leaves_only_content(servers, style, off, stream):
    url, engine = servers[style]
    reasoning, content, _, _ = ask(url, engine, [ANSWER], stream, **off)
    assert (reasoning, content) == (None, ANSWER)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    on = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=1).usage.prompt_tokens
    shut = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=1, **off).usage.prompt_tokens
    assert shut > on  # the template closed the reasoning (or, where it cannot, the server did)


def test_reasoning_content_sent_back_reaches_the_template(servers):
    url, engine = servers["prompt_opens"]
    messages = USER + [{"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT},
                       {"role": "user", "content": "And tomorrow?"}]
    ids = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=10).json()["tokens"]
    text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert f"<|im_start|>assistant\n<think>\n{THOUGHT}\n</think>\n\n{ANSWER}<|im_end|>" in text
