"""The chat template's Jinja sandbox, bounded: a deadline and a stop flag checked at every call, attribute or item
access, loop iteration and output piece, and a cap on the rendered text and on strings or lists built with +, *, ~."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

CHECK_EVERY = 64  # loop iterations between two deadline checks
MAX_EXPONENT_BITS = 1 << 16  # ** on integers: the result's size in bits


class ChatTemplateError(ValueError):
    pass


class TemplateTimeout(ChatTemplateError):
    """Rendering ran past RenderLimits.seconds and was stopped (the template's fault, not the request's)."""


class TemplateStopped(ChatTemplateError):
    """Rendering was stopped from outside (RenderLimits.stopped: the server shutting down)."""


class TemplateTooLarge(ChatTemplateError):
    """The rendered text, or a string or list built on the way, passed RenderLimits.max_chars."""


@dataclass(frozen=True)
class RenderLimits:
    seconds: float | None = None  # wall-clock limit of one rendering
    max_chars: int | None = None  # the rendered text, and any string or list the template builds
    stopped: Callable[[], bool] | None = None  # polled with the deadline


@dataclass
class _Budget:
    deadline: float | None
    limits: RenderLimits


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise ChatTemplateError(message)


def _env_call(env, name: str, arg: nodes.Expr) -> nodes.Call:
    call = nodes.Call(nodes.EnvironmentAttribute(name), [arg], [], None, None, lineno=arg.lineno)
    return call.set_environment(env)


class _WrapLoopsAndConcats(NodeTransformer):
    """Every `for` iterates through environment.checked_iter, every `~` result passes environment.checked_text."""

    def __init__(self, env):
        self.env = env

    def visit_For(self, node: nodes.For):
        self.generic_visit(node)
        node.iter = _env_call(self.env, "checked_iter", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat):
        self.generic_visit(node)
        return _env_call(self.env, "checked_text", node)


class _CheckedCodeGenerator(CodeGenerator):
    def visit_Template(self, node, frame=None):
        _WrapLoopsAndConcats(self.environment).visit(node)
        super().visit_Template(node, frame)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Limits apply to renderings inside `render(template, limits, **vars)`, per thread."""

    code_generator_class = _CheckedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**"})

    def __init__(self, source: str):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.source = source  # what the template is, for errors: a file, or a field of one
        self._local = threading.local()
        self.filters["tojson"] = _tojson
        self.globals["raise_exception"] = _raise
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

    def render(self, template: jinja2.Template, limits: RenderLimits | None, **variables) -> str:
        limits = limits or RenderLimits()
        deadline = time.monotonic() + limits.seconds if limits.seconds is not None else None
        self._local.budget = _Budget(deadline, limits)
        try:
            pieces, total = [], 0
            for piece in template.generate(**variables):
                total += len(piece)
                self.checked_size(total)
                self.tick()
                pieces.append(piece)
            return "".join(pieces)
        finally:
            self._local.budget = None

    # ---- checks (called from compiled template code) --------------------------------------------------
    def tick(self):
        budget = getattr(self._local, "budget", None)
        if budget is None:
            return
        if budget.deadline is not None and time.monotonic() > budget.deadline:
            raise TemplateTimeout(f"the chat template ({self.source}) ran past its {budget.limits.seconds:g} s limit "
                                  f"and was stopped: it loops too long for these messages")
        if budget.limits.stopped is not None and budget.limits.stopped():
            raise TemplateStopped(f"rendering the chat template ({self.source}) was stopped: the server is shutting "
                                  f"down")

    def checked_size(self, n: int):
        budget = getattr(self._local, "budget", None)
        if budget is not None and budget.limits.max_chars is not None and n > budget.limits.max_chars:
            raise TemplateTooLarge(f"the chat template ({self.source}) built more than {budget.limits.max_chars} "
                                   f"characters for these messages")

    def checked_iter(self, iterable):
        for i, item in enumerate(iterable):
            if i % CHECK_EVERY == 0:
                self.tick()
            yield item

    def checked_text(self, text):
        self.checked_size(len(text))
        return text

    # ---- sandbox hooks ---------------------------------------------------------------------------------
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's own spelling)
        __self.tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        self.tick()
        sized = (str, list, tuple)
        if operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            self.checked_size(len(left) + len(right))
        elif operator == "*":
            seq, times = (left, right) if isinstance(left, sized) else (right, left)
            if isinstance(seq, sized) and isinstance(times, int):
                self.checked_size(len(seq) * max(times, 0))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * left.bit_length() > MAX_EXPONENT_BITS:
                raise TemplateTooLarge(f"the chat template ({self.source}) raises {left} to the power {right}: too "
                                       f"large")
        return super().call_binop(context, operator, left, right)


def compile_template(source_text: str, source: str) -> tuple[BoundedSandbox, jinja2.Template]:
    env = BoundedSandbox(source)
    try:
        return env, env.from_string(source_text)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template ({source}) does not compile: {e}") from None
