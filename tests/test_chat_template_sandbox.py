"""The chat template's bounded sandbox: loops stopped at the deadline, growth capped, output unchanged."""
from __future__ import annotations

import time

import pytest

from moepage.engine.chat_template import RenderLimits, TemplateTimeout, TemplateTooLarge, compile_template
from moepage.engine.tokenizer import Tokenizer
from server_support import USER, small_demo


@pytest.mark.parametrize("source", [
    "{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",  # loops with no call, no output
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% macro m(n) %}{{ m(n) }}{% endmacro %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% if j is even %}{% endif %}{% endfor %}{% endfor %}",
])
def test_sandbox_stops_loops_at_the_deadline(source):
    env, template = compile_template(source, "test template")
    t = time.monotonic()
    with pytest.raises(TemplateTimeout, match="test template"):
        env.render(template, RenderLimits(seconds=0.3), s="x" * 100_000)
    assert time.monotonic() - t < 1.5


@pytest.mark.parametrize("source", [
    "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
    "{% set ns = namespace(x=[1]) %}{% for i in range(60) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
    "{{ 'a' * 10 ** 10 }}",
    "{{ 7 ** 10000000 }}",
])
def test_sandbox_caps_what_a_template_builds(source):
    env, template = compile_template(source, "test template")
    with pytest.raises(TemplateTooLarge):
        env.render(template, RenderLimits(seconds=5, max_chars=1_000_000))


def test_bounded_sandbox_renders_the_chat_template_as_before(tmp_path):
    """The checks change no output: the demo's ChatML template, tools and all."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from moepage.engine.chat_template import _tojson

    tk = Tokenizer.from_dir(small_demo(tmp_path / "model"))
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    plain.filters["tojson"] = _tojson
    messages = [{"role": "system", "content": "be brief"}, *USER, {"role": "assistant", "content": "Sunny."}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for kwargs in ({"tools": None}, {"tools": tools}):
        want = plain.from_string(tk.chat_template).render(messages=messages, add_generation_prompt=True,
                                                          bos_token="", eos_token=tk.eos_token, **kwargs)
        got = tk.render_chat(messages, kwargs["tools"], True, RenderLimits(seconds=5, max_chars=10**6))
        assert got == want


def test_sandbox_stops_when_told_to():
    from moepage.engine.chat_template import TemplateStopped

    env, template = compile_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                     "{% endfor %}", "test template")
    stop = time.monotonic() + 0.2
    with pytest.raises(TemplateStopped, match="shutting down"):
        env.render(template, RenderLimits(seconds=60, stopped=lambda: time.monotonic() > stop))
