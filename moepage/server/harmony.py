"""The Harmony chat format (gpt-oss): the model's messages split into the OpenAI fields.

After the generation prompt `<|start|>assistant` the model writes one or more messages, each a header and a body:
    <|channel|>analysis<|message|>REASONING<|end|>
    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{ARGS}<|call|>
    <|start|>assistant<|channel|>final<|message|>ANSWER<|return|>
(the recipient may also stand before the channel: `<|start|>assistant to=functions.NAME<|channel|>commentary json`).
`analysis` goes to reasoning_content; a message to a recipient is a tool call (`functions.` dropped from the name)
whose body is its arguments; `final`, and `commentary` to no one (a preamble), go to content. Output that has no
Harmony header (a model that does not follow the format) is content. Text that may be the start of a marker is
held back, so feeding the whole text at once and feeding it token by token give the same fields.
"""
from __future__ import annotations

import re
import secrets

from moepage.server.reasoning import ReasoningDelta
from moepage.server.tool_parsers import ContentDelta, ParsedToolCall, ToolCallArguments, ToolCallStart, held_prefix

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, CALL, RETURN = "<|constrain|>", "<|call|>", "<|return|>"
MARKERS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, CALL, RETURN)
BODY_ENDS = (END, CALL, RETURN, START)  # a <|start|> in a body: the model left out its <|end|>
HEADER_OPENERS = (CHANNEL, "to=", CONSTRAIN)
MAX_HEADER_CHARS = 512  # a longer "header" is not one: it is shown as content
ROLE = "assistant"

_CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")
_RECIPIENT = re.compile(r"(?:^|\s|>)to=([^\s<]+)")


def is_harmony(template: str | None) -> bool:
    """Whether a chat template writes Harmony (gpt-oss's template renders `<|channel|>` headers)."""
    return bool(template) and CHANNEL in template and MESSAGE in template


class HarmonyParser:
    """feed(text) -> [ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArguments]; finish() flushes.

    tools None: tool calls are not parsed (tool_choice "none", or no tools): their bodies go to content."""

    def __init__(self, tools: list[dict] | None = None):
        self.parse_tools = tools is not None
        self.calls: list[ParsedToolCall] = []
        self.reasoning = ""
        self._buf = ""
        self._kind: str | None = None  # None: reading a header; "reasoning" | "content" | "tool" in a body
        self._after_start = True  # the generation prompt ended with <|start|>assistant

    @property
    def reasoning_text(self) -> str | None:
        return self.reasoning or None

    def feed(self, text: str) -> list:
        self._buf += text
        out: list = []
        while self._buf:
            if self._kind is None:
                if not self._header(out, final=False):
                    break
            else:
                ends = [(self._buf.find(t), t) for t in BODY_ENDS if t in self._buf]
                if not ends:
                    keep = held_prefix(self._buf, BODY_ENDS)
                    out += self._body(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                at, tag = min(ends)
                out += self._body(self._buf[:at])
                self._buf = self._buf[at:] if tag == START else self._buf[at + len(tag):]
                self._kind, self._after_start = None, False
        return out

    def finish(self) -> list:
        out: list = []
        if self._kind is None:
            self._header(out, final=True)
        if self._kind is not None:
            out += self._body(self._buf)
        self._buf, self._kind = "", None
        return out

    # ---- headers ------------------------------------------------------------------------------------------------
    def _strip_start(self) -> str:
        """The buffer without leading whitespace, <|start|> markers and the role after one."""
        s = self._buf
        while True:
            s = s.lstrip()
            if s.startswith(START):
                s, self._after_start = s[len(START):], True
                self._buf = s
            elif self._after_start and s.startswith(ROLE):
                s, self._after_start = s[len(ROLE):], False
                self._buf = s
            else:
                return s

    def _header(self, out: list, final: bool) -> bool:
        """Consumes a header (True) or waits for more text (False); text that is no header opens a content body."""
        s = self._strip_start()
        if s.startswith(HEADER_OPENERS):
            at = s.find(MESSAGE)
            if 0 <= at <= MAX_HEADER_CHARS:
                self._open(s[:at], out)
                self._buf = s[at + len(MESSAGE):]
                return True
            if len(s) <= MAX_HEADER_CHARS:
                if final:  # a header cut off by the end of the output: nothing to show
                    self._buf = ""
                return False
        elif not s or (not final and self._may_open(s)):
            return False
        self._kind, self._buf = "content", s  # not Harmony (or a runaway header): the text is content
        return True

    def _may_open(self, s: str) -> bool:
        """Whether s may still become a header (it is the start of a header opener, a <|start|> or the role)."""
        return any(o.startswith(s) for o in (*HEADER_OPENERS, START)) or (self._after_start and ROLE.startswith(s))

    def _open(self, header: str, out: list) -> None:
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        channel = channel.group(1) if channel else ""
        if recipient and self.parse_tools:
            name = recipient.group(1)
            name = name[len("functions."):] if name.startswith("functions.") else name
            call = ParsedToolCall(id="call_" + secrets.token_hex(12), name=name)
            self.calls.append(call)
            out.append(ToolCallStart(len(self.calls) - 1, call.id, name))
            self._kind = "tool"
        elif channel == "analysis":
            self._kind = "reasoning"
        else:
            self._kind = "content"

    # ---- bodies -------------------------------------------------------------------------------------------------
    def _body(self, text: str) -> list:
        if not text:
            return []
        if self._kind == "reasoning":
            self.reasoning += text
            return [ReasoningDelta(text)]
        if self._kind == "tool":
            self.calls[-1].arguments += text
            return [ToolCallArguments(len(self.calls) - 1, text)]
        return [ContentDelta(text)]
