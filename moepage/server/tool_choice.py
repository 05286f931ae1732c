"""`tool_choice`: which tool-call format the chat template implies, and the prefix that forces a call.

- "auto" (or absent): tools go to the chat template; the model's output is parsed for tool calls.
- "none": as vLLM does by default, tools still go to the chat template (the prompt is the same as with
  "auto"), but the output is not parsed: any tool-call text stays in `content` and finish_reason is
  never "tool_calls".
- "required": generation is forced to start with the template's tool-call opening, by appending its tokens
  to the prompt (`<tool_call>\\n` for Hermes/Qwen JSON and Qwen3-Coder XML, `[TOOL_CALLS]` for Mistral).
  The parser is fed that text first, so the call comes back as `tool_calls`. This is a forced prefix, not
  constrained decoding (vLLM uses a grammar): the first call is guaranteed to be opened; its arguments are
  whatever the model writes.
- {"type": "function", "function": {"name": X}}: the prefix goes on to name X, so the first call is to X:
  Hermes/Qwen `<tool_call>\\n{"name": "X", "arguments": `, Qwen3-Coder `<tool_call>\\n<function=X>\\n`,
  Mistral `[TOOL_CALLS]X[ARGS]` (templates with [ARGS]) or `[TOOL_CALLS][{"name": "X", "arguments": `,
  GLM-4.5 `<tool_call>X\n` (its templates show `<arg_key>`; without a name, `<tool_call>`).

The prefix tokens count as prompt tokens in `usage`.
"""
from __future__ import annotations

import json

from moepage.server.harmony import CHANNEL, CONSTRAIN, MESSAGE, is_harmony
from moepage.server.tool_parsers import HERMES_OPEN, MISTRAL_OPEN

# Formats of a forced prefix: Hermes/Qwen JSON, Qwen3-Coder XML, Mistral JSON array, Mistral NAME[ARGS]{...},
# Harmony (gpt-oss) `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>`.
HERMES_JSON, QWEN3_CODER_XML, MISTRAL_JSON, MISTRAL_ARGS = "hermes", "qwen3_coder", "mistral", "mistral_args"
HARMONY = "harmony"
GLM_XML = "glm"
GLM_ARG_KEY = "<arg_key>"


def template_tool_format(template: str | None, configured: str = "auto") -> str | None:
    """The tool-call format the model writes, from the chat template text (or --tool-parser when it is set).

    The template shows the model its call format (Qwen's system prompt spells out
    `<tool_call>\\n{"name": ...}` or `<tool_call>\\n<function=...>`) and renders past calls the same way.
    """
    t = template or ""
    if configured == "auto" and is_harmony(t):
        return HARMONY
    if configured == "glm" or (configured == "auto" and GLM_ARG_KEY in t):
        return GLM_XML
    if configured == "qwen3_coder" or (configured in ("auto", "hermes") and "<function=" in t):
        return QWEN3_CODER_XML
    if configured == "hermes" or (configured == "auto" and HERMES_OPEN in t):
        return HERMES_JSON
    if configured == "mistral" or (configured == "auto" and MISTRAL_OPEN in t):
        return MISTRAL_ARGS if "[ARGS]" in t else MISTRAL_JSON
    return None


def forced_prefix(fmt: str, name: str | None) -> str:
    """Text the generation is made to start with: the call opening, and with a name, the call's name."""
    if fmt == QWEN3_CODER_XML:
        return HERMES_OPEN + "\n" + (f"<function={name}>\n" if name else "")
    if fmt == GLM_XML:
        return HERMES_OPEN + (f"{name}\n" if name else "")
    if fmt == HERMES_JSON:
        return HERMES_OPEN + "\n" + ('{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
                                    if name else "")
    if fmt == MISTRAL_ARGS:
        return MISTRAL_OPEN + (f"{name}[ARGS]" if name else "")
    if fmt == HARMONY:  # without a name the model writes it, then its header's end
        return CHANNEL + "commentary to=functions." + (f"{name} {CONSTRAIN}json{MESSAGE}" if name else "")
    if fmt == MISTRAL_JSON:
        return MISTRAL_OPEN + ('[{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
                               if name else "")
    raise ValueError(f"unknown tool-call format {fmt!r}")
