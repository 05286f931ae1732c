"""Reasoning output: `<think>...</think>` in the model's text goes to reasoning_content, the rest to content.

Two template styles: the model opens `<think>` itself (Qwen3 hybrid, DeepSeek-R1), or the generation prompt
already ends in an open `<think>` (Qwen3.5/3.6, Qwen3-thinking), where the output starts inside the reasoning.
A tool-call opening inside the reasoning ends it: the call goes to the tool parser. Text that may be the start
of a tag is held back, so streamed and whole-text splitting agree.
"""
from __future__ import annotations

from dataclasses import dataclass

from moepage.server.tool_parsers import held_prefix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPENERS = ("<tool_call>", "<function=", "[TOOL_CALLS]")
CLOSE_THINKING = "\n\n" + THINK_CLOSE + "\n\n"  # appended to a prompt that opened <think> when thinking is off


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class TextDelta:
    text: str


def prompt_opens_thinking(prompt_tail: str) -> bool:
    """Whether a rendered prompt ends inside an open <think> (its generation prompt starts the reasoning)."""
    tail = prompt_tail.rstrip()
    return tail.endswith(THINK_OPEN)


class ReasoningSplitter:
    """feed(text) -> [ReasoningDelta | TextDelta]; finish() flushes what was held back. Newlines around the
    reasoning (a template's) belong to neither part."""

    def __init__(self, in_reasoning: bool = False, detect_open: bool = True):
        self.in_reasoning = in_reasoning
        self.detect_open = detect_open and not in_reasoning  # a <think> may open the output, nowhere else
        self.reasoning = ""
        self._after_close = False
        self._buf = ""

    def feed(self, text: str) -> list:
        self._buf += text
        out = []
        while self._buf:
            if self.detect_open:
                lead = self._buf.lstrip()
                if lead.startswith(THINK_OPEN):
                    self._buf = lead[len(THINK_OPEN):]
                    self.in_reasoning, self.detect_open = True, False
                    continue
                if not lead or THINK_OPEN.startswith(lead):
                    break  # whitespace or part of <think> so far: wait
                self.detect_open = False
            if not self.in_reasoning:
                if self._after_close:
                    self._buf = self._buf.lstrip("\n")
                    if not self._buf:
                        break
                    self._after_close = False
                out.append(TextDelta(self._buf))
                self._buf = ""
                break
            ends = [(self._buf.find(t), t) for t in (THINK_CLOSE,) + TOOL_OPENERS if t in self._buf]
            if ends:
                at, tag = min(ends)
                out += self._reason(self._buf[:at].rstrip("\n"))
                self._buf = self._buf[at + len(tag):] if tag == THINK_CLOSE else self._buf[at:]
                self.in_reasoning, self._after_close = False, True
                continue
            head = self._buf[: len(self._buf) - held_prefix(self._buf, (THINK_CLOSE,) + TOOL_OPENERS)]
            keep = len(self._buf) - len(head.rstrip("\n"))  # a tag's start and the newlines before it wait
            out += self._reason(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            break
        return out

    def _reason(self, text: str) -> list:
        if not self.reasoning:
            text = text.lstrip("\n")
        if not text:
            return []
        self.reasoning += text
        return [ReasoningDelta(text)]

    def finish(self) -> list:
        buf, self._buf = self._buf, ""
        if self.in_reasoning:
            return self._reason(buf.rstrip("\n"))
        if self._after_close:
            buf = buf.lstrip("\n")
        return [TextDelta(buf)] if buf else []

    @property
    def reasoning_text(self) -> str | None:
        return self.reasoning or None
