"""GLM-4.5/4.6/4.7's tool-call body, after `<tool_call>` and before `</tool_call>`:

    NAME
    <arg_key>K</arg_key>
    <arg_value>V</arg_value>
    ...

(GLM-4.7 writes it without the newlines). The chat template writes string values as they are and every other value
as JSON, so values are converted by the tool's JSON schema (tool_values.xml_value), as Qwen3-Coder's are. Fed the
body as it grows: the call starts once its name is complete and each argument is sent once its value closes, so
streamed and whole-text parsing give the same call.
"""
from __future__ import annotations

import json
import re
from typing import Callable

from moepage.server.tool_values import xml_value

ARG_KEY = "<arg_key>"
_NAME = re.compile(r"[^\s<>{}\[\]\"']{1,256}")
_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def looks_like_glm(body: str) -> bool:
    """The body's first visible character can start a GLM call (a function name, not Hermes JSON or XML)."""
    stripped = body.lstrip()
    return bool(stripped) and stripped[0] not in "{<[\"'"


class GlmCallBody:
    """One GLM call's body; progress(body, final) -> events, or None when the body is not a GLM call (then the
    caller passes the block on as text)."""

    def __init__(self, start_call: Callable, arguments: Callable, param_types: dict[str, dict[str, set[str]]]):
        self.start_call, self.arguments, self.param_types = start_call, arguments, param_types
        self.index: int | None = None
        self.name = ""
        self.pos = 0  # where the next <arg_key> may start
        self.params = 0

    def _name_end(self, body: str, final: bool) -> int | None:
        ends = [i for i in (body.find("\n", len(body) - len(body.lstrip())), body.find(ARG_KEY)) if i >= 0]
        return min(ends) if ends else (len(body) if final else None)

    def progress(self, body: str, final: bool) -> list | None:
        events = []
        if self.index is None:
            end = self._name_end(body, final)
            if end is None:
                return events
            name = body[:end].strip()
            if not _NAME.fullmatch(name):
                return None
            self.name = name
            self.index, start = self.start_call(name)
            events.append(start)
            self.pos = end
        types = self.param_types.get(self.name, {})
        while (m := _ARG.match(body, self.pos)) is not None:
            head = "{" if self.params == 0 else ", "
            key = m.group(1).strip()
            events.append(self.arguments(self.index, f"{head}{json.dumps(key)}: {xml_value(m.group(2), types.get(key))}"))
            self.params += 1
            self.pos = m.end()
        if final:
            events.append(self.arguments(self.index, "}" if self.params else "{}"))
        return events
