"""Streaming tool-call parsers: model text in, content deltas and OpenAI tool-call events out.

Formats: Hermes/Qwen JSON `<tool_call>{"name", "arguments"}</tool_call>`, Qwen3-Coder XML
`<tool_call><function=NAME><parameter=P>V</parameter></function></tool_call>` (also without the `<tool_call>`
wrapper or a parameter's closing tag; values converted by the tool's JSON schema), and Mistral
`[TOOL_CALLS][{"name", "arguments"}, ...]` or `[TOOL_CALLS]NAME[ARGS]{...}`, and GLM-4.5's
`<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>` (server/glm_tool_calls.py).
Text that may be the start of a tag is held back, so no tag text reaches content. Feeding the whole
text at once (non-streamed) and feeding it token by token (streamed) give the same calls.
"""
from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from moepage.server.glm_tool_calls import GlmCallBody, looks_like_glm
from moepage.server.tool_values import param_types, xml_value

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
MISTRAL_OPEN = "[TOOL_CALLS]"
FORMATS = ("hermes", "qwen3_coder", "mistral", "glm")

_NAME_FIRST = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
# a parameter ends at its closing tag, or (the tag left out) where the next parameter or the function's end begins
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=\s*<parameter=)|(?=\s*</function>))",
                        re.DOTALL)
_ALNUM = string.ascii_letters + string.digits


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolCallArguments:
    index: int
    delta: str


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str = ""


def _call_id(mistral: bool = False) -> str:
    if mistral:  # Mistral chat templates require 9 alphanumeric characters
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def held_prefix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of tags."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


def _balanced_end(text: str) -> int | None:
    """Index just past the JSON object/array that text starts with, or None while it is still open."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class _Block:
    """One tool-call block after its opening tag; consumes text until it closes."""

    closed = False

    def feed(self, text: str) -> tuple[list, str | None]:
        """Returns events and, once the block closed, the text after it (else None)."""
        raise NotImplementedError

    def finish(self) -> list:
        raise NotImplementedError


class _TaggedBlock(_Block):
    """`<tool_call>` ... `</tool_call>` holding either Hermes JSON or Qwen3-Coder XML; or, opened by a bare
    `<function=`, Qwen3-Coder XML up to `</function>`."""

    def __init__(self, parser: "ToolCallParser", allow_json: bool, allow_xml: bool, bare: bool = False,
                 allow_glm: bool = False):
        self.p = parser
        self.glm = GlmCallBody(parser.start_call, parser.arguments, parser.param_types) if allow_glm and not bare \
            else None
        self.bare = bare
        self.close = FUNCTION_CLOSE if bare else HERMES_CLOSE
        self.body = FUNCTION_OPEN if bare else ""
        self.allow_json, self.allow_xml = allow_json, allow_xml
        self.kind: str | None = None  # "json" | "xml"
        self.index: int | None = None
        self.args_start = 0
        self.sent = 0  # characters of the arguments already emitted (json)
        self.xml_pos = 0
        self.xml_params = 0

    def feed(self, text: str):
        self.body += text
        end = self.body.find(self.close)
        if end < 0:
            visible = self.body[: len(self.body) - held_prefix(self.body, (self.close,))]
            return self._progress(visible, final=False), None
        rest = self.body[end + len(self.close):]
        self.body = self.body[:end] + (FUNCTION_CLOSE if self.bare else "")
        self.closed = True
        return self._progress(self.body, final=True), rest

    def _raw(self) -> list:
        if self.bare:
            return [ContentDelta(self.body)]
        return [ContentDelta(HERMES_OPEN + self.body + (HERMES_CLOSE if self.closed else ""))]

    def finish(self):
        return self._progress(self.body, final=True)

    def _progress(self, body: str, final: bool) -> list:
        stripped = body.lstrip()
        if self.kind is None and stripped:
            if stripped[0] == "{" and self.allow_json:
                self.kind = "json"
            elif stripped[0] == "<" and self.allow_xml:
                self.kind = "xml"
            elif self.glm is not None and looks_like_glm(stripped):
                self.kind = "glm"
            else:
                self.kind = "raw"
        if self.kind == "json":
            return self._json(body, final)
        if self.kind == "xml":
            return self._xml(body, final)
        if self.kind == "glm":
            events = self.glm.progress(body, final)
            if events is not None:
                return events
            self.kind = "raw"
        return self._raw() if final else []

    def _json(self, body: str, final: bool) -> list:
        events = []
        if self.index is None:
            m = _NAME_FIRST.match(body)
            if m:
                self.index, start = self.p.start_call(json.loads(f'"{m.group(1)}"'))
                events.append(start)
                self.args_start = m.end()
            elif final:
                return self._json_whole(body)
            else:
                return events
        raw = body[self.args_start:].lstrip()
        if raw[:1] in ("{", "["):  # an object streams as it comes; text after its closing brace is not arguments
            end = _balanced_end(raw)
            args = raw if end is None else raw[:end]
            if end is None and final:
                args = args.rstrip()
        elif raw[:1] == '"':  # arguments given as a JSON string holding the arguments: sent once it is complete
            try:
                value, _ = json.JSONDecoder().raw_decode(raw)
            except ValueError:
                value = None
            args = value if isinstance(value, str) else ""
        else:
            args = ""
        if final and not args and self.sent == 0:
            args = "{}"
        if len(args) > self.sent:
            events.append(self.p.arguments(self.index, args[self.sent:]))
            self.sent = len(args)
        return events

    def _json_whole(self, body: str) -> list:
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            self.kind = "raw"
            return self._raw()
        args = obj.get("arguments", obj.get("parameters", {}))
        self.index, start = self.p.start_call(obj["name"])
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return [start, self.p.arguments(self.index, text)]

    def _xml(self, body: str, final: bool) -> list:
        events = []
        if self.index is None:
            m = _FUNCTION.match(body)
            if not m:
                if final:
                    self.kind = "raw"
                    return self._raw()
                return events
            self.name = m.group(1).strip()
            self.index, start = self.p.start_call(self.name)
            events.append(start)
            self.xml_pos = m.end()
        types = self.p.param_types.get(self.name, {})
        while True:
            m = _PARAMETER.match(body, self.xml_pos)
            if not m:
                break
            key = m.group(1).strip()
            head = "{" if self.xml_params == 0 else ", "
            events.append(self.p.arguments(self.index, f"{head}{json.dumps(key)}: {xml_value(m.group(2), types.get(key))}"))
            self.xml_params += 1
            self.xml_pos = m.end()
        if final:
            events.append(self.p.arguments(self.index, "}" if self.xml_params else "{}"))
        return events


class _MistralBlock(_Block):
    """After `[TOOL_CALLS]`: a JSON array of calls, or NAME[ARGS]{json}; runs to the end of the text."""

    def __init__(self, parser: "ToolCallParser"):
        self.p = parser
        self.text = ""
        self.pos = 0
        self.decoder = json.JSONDecoder()
        self.emitted = False

    def feed(self, text: str):
        self.text += text
        return self._parse(final=False), None

    def finish(self):
        return self._parse(final=True)

    def _emit(self, name: str, args) -> list:
        self.emitted = True
        index, start = self.p.start_call(name, mistral=True)
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return [start, self.p.arguments(index, text)]

    def _parse(self, final: bool) -> list:
        events = []
        while True:
            rest = self.text[self.pos:]
            body = rest.lstrip(" \t\r\n,")
            skip = len(rest) - len(body)
            if body.startswith(MISTRAL_OPEN):
                self.pos += skip + len(MISTRAL_OPEN)
                continue
            if body.startswith("[") or body.startswith("{"):
                if body.startswith("["):
                    body, skip = body[1:], skip + 1
                try:
                    obj, used = self.decoder.raw_decode(body)
                except ValueError:
                    break
                self.pos += skip + used
                items = obj if isinstance(obj, list) else [obj]
                for item in items:
                    if isinstance(item, dict) and isinstance(item.get("name"), str):
                        events += self._emit(item["name"], item.get("arguments", item.get("parameters", {})))
                tail = self.text[self.pos:].lstrip()
                if tail.startswith("]"):
                    self.pos = len(self.text) - len(tail) + 1
                continue
            marker = body.find("[ARGS]")
            if marker > 0:
                name = body[:marker].strip()
                try:
                    args, used = self.decoder.raw_decode(body[marker + len("[ARGS]"):].lstrip())
                except ValueError:
                    break
                lead = len(body[marker + len("[ARGS]"):]) - len(body[marker + len("[ARGS]"):].lstrip())
                self.pos += skip + marker + len("[ARGS]") + lead + used
                events += self._emit(name, args)
                continue
            break
        if final:
            leftover = self.text[self.pos:]
            if leftover.strip(" \t\r\n]"):
                events.append(ContentDelta(leftover if self.emitted else MISTRAL_OPEN + self.text))
        return events


@dataclass
class ToolCallParser:
    """feed(text) -> events while generating, finish() -> events at the end; calls collects the result."""

    tools: list[dict] | None = None
    formats: tuple[str, ...] = FORMATS
    calls: list[ParsedToolCall] = field(default_factory=list)

    def __post_init__(self):
        unknown = set(self.formats) - set(FORMATS)
        if unknown:
            raise ValueError(f"unknown tool-call format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}")
        self.param_types = param_types(self.tools)
        tags = []
        if "hermes" in self.formats or "qwen3_coder" in self.formats or "glm" in self.formats:
            tags.append(HERMES_OPEN)
        if "qwen3_coder" in self.formats:
            tags.append(FUNCTION_OPEN)
        if "mistral" in self.formats:
            tags.append(MISTRAL_OPEN)
        self.tags = tuple(tags)
        self._buf = ""
        self._block: _Block | None = None
        self._after_call = False  # drop whitespace between and after calls

    # callbacks for blocks
    def start_call(self, name: str, mistral: bool = False) -> tuple[int, ToolCallStart]:
        call = ParsedToolCall(_call_id(mistral), name)
        self.calls.append(call)
        return len(self.calls) - 1, ToolCallStart(len(self.calls) - 1, call.id, name)

    def arguments(self, index: int, delta: str) -> ToolCallArguments:
        self.calls[index].arguments += delta
        return ToolCallArguments(index, delta)

    def _open(self, tag: str) -> _Block:
        if tag == MISTRAL_OPEN:
            return _MistralBlock(self)
        return _TaggedBlock(self, "hermes" in self.formats, "qwen3_coder" in self.formats, bare=tag == FUNCTION_OPEN,
                            allow_glm="glm" in self.formats)

    def _content(self, text: str, final: bool = False) -> list:
        if not text:
            return []
        if self._after_call and not text.strip():
            return []
        return [ContentDelta(text)]

    def feed(self, text: str) -> list:
        events = []
        self._buf += text
        while self._buf:
            if self._block is not None:
                got, rest = self._block.feed(self._buf)
                events += got
                self._buf = ""
                if rest is None:
                    break
                self._block = None
                self._after_call = bool(self.calls)
                self._buf = rest
                continue
            hits = [(self._buf.find(t), t) for t in self.tags if t in self._buf]
            if hits:
                at, tag = min(hits)
                events += self._content(self._buf[:at])
                self._buf = self._buf[at + len(tag):]
                self._block = self._open(tag)
                continue
            keep = held_prefix(self._buf, self.tags)
            if self._after_call and not self._buf[: len(self._buf) - keep].strip():
                break  # whitespace after a call: wait to see whether more text or another call follows
            events += self._content(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            self._after_call = False
            break
        return events

    def finish(self) -> list:
        events = []
        if self._block is not None:
            events += self._block.finish()
            self._block = None
        elif self._buf and not (self._after_call and not self._buf.strip()):
            events.append(ContentDelta(self._buf))
        self._buf = ""
        return events


def parse_all(text: str, tools: list[dict] | None = None, formats: tuple[str, ...] = FORMATS):
    """Non-streamed: (content or None, calls)."""
    parser = ToolCallParser(tools, formats)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return (content if content.strip() or not parser.calls else None), parser.calls
