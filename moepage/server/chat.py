"""POST /v1/chat/completions: template, generate, parse tool calls; JSON or SSE chunks."""
from __future__ import annotations

import asyncio
import json
import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from moepage.engine.engine import StepOutput
from moepage.server.errors import APIError
from moepage.server.generation import ClientDisconnected, GenerationService, engine_error
from moepage.server.harmony import HarmonyParser, is_harmony
from moepage.server.json_schema import check_schema, validate as validate_json
from moepage.server.prompts import chat_prompt_ids, tool_dicts
from moepage.server.reasoning import CLOSE_THINKING, ReasoningDelta, ReasoningSplitter, prompt_opens_thinking
from moepage.server.protocol import (
    ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChoiceLogprobs, ChunkChoice, Delta,
    DeltaFunctionCall, DeltaToolCall, ResponseFunctionCall, ResponseMessage, ResponseToolCall, TokenLogprob,
    TopLogprob, Usage, new_id, now,
)
from moepage.server.streaming import DONE, chunk_json, error_event, sse_response
from moepage.server.tool_choice import forced_prefix, template_tool_format
from moepage.server.tool_parsers import FORMATS, ContentDelta, ToolCallArguments, ToolCallParser, ToolCallStart

log = logging.getLogger("moepage.server")


class ChoiceAssembler:
    """Turns one generation's steps into deltas (streamed) and the final message (both from the same parser)."""

    def __init__(self, index: int, tokenizer, tools: list[dict] | None, formats: tuple[str, ...], logprobs: bool,
                 prefix: str = "", thinking: bool = False, max_calls: int | None = None, harmony: bool = False):
        self.index = index
        self.tokenizer = tokenizer
        # harmony: a Harmony template (gpt-oss): one parser splits reasoning, tool calls and content
        self.harmony = HarmonyParser(tools) if harmony else None
        self.parser = ToolCallParser(tools, formats) if tools and not harmony else None
        self.max_calls = max_calls  # parallel_tool_calls false: 1 (later calls are dropped)
        self.prefix = prefix  # forced tool-call opening already in the prompt: parsed as if the model wrote it
        # thinking: the prompt ends inside an open <think>; with a forced prefix the output is a tool call
        self.reasoning = ReasoningSplitter(in_reasoning=thinking, detect_open=not prefix)
        self.want_logprobs = logprobs
        self.content = ""
        self.logprobs: list[TokenLogprob] = []
        self._pending_lp: list[TokenLogprob] = []
        self.tokens = 0
        self.finish_reason: str | None = None

    def _token_lp(self, token: int, logprob: float, top) -> TokenLogprob:
        def entry(t, lp):
            text = self.tokenizer.decode([t], skip_special_tokens=False) if self.tokenizer else str(t)
            return TopLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))

        head = entry(token, logprob)
        return TokenLogprob(**head.model_dump(), top_logprobs=[entry(t, lp) for t, lp in (top or [])])

    def start(self) -> list[Delta]:
        """Deltas of the forced prefix (a tool call's start: its id and, when named, its name)."""
        if self.harmony is not None:
            return self._split(self.harmony.feed(self.prefix)) if self.prefix else []
        return self._deltas(self.parser.feed(self.prefix)) if self.parser and self.prefix else []

    def step(self, s: StepOutput) -> list[Delta]:
        self.tokens += 1
        if self.want_logprobs and s.logprob is not None:
            lp = self._token_lp(s.token, s.logprob, s.top_logprobs)
            self.logprobs.append(lp)
            self._pending_lp.append(lp)
        if s.finish_reason:
            self.finish_reason = s.finish_reason
        return self._split(self.harmony.feed(s.text) if self.harmony is not None else self.reasoning.feed(s.text))

    def _split(self, parts) -> list[Delta]:
        out = []
        for part in parts:
            if isinstance(part, ReasoningDelta):
                out.append(Delta(reasoning_content=part.text))
            elif isinstance(part, (ContentDelta, ToolCallStart, ToolCallArguments)):  # Harmony's events
                out += self._deltas([part])
            elif part.text:
                out += self._deltas(self.parser.feed(part.text) if self.parser else [ContentDelta(part.text)])
        return out

    def finish(self) -> list[Delta]:
        if self.harmony is not None:
            deltas = self._split(self.harmony.finish())
            if self.harmony.calls and self.finish_reason == "stop":
                self.finish_reason = "tool_calls"
            return deltas
        deltas = self._split(self.reasoning.finish())
        deltas += self._deltas(self.parser.finish()) if self.parser else []
        if self.parser and self.parser.calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        return deltas

    def take_logprobs(self) -> ChoiceLogprobs | None:
        if not self._pending_lp:
            return None
        out, self._pending_lp = self._pending_lp, []
        return ChoiceLogprobs(content=out)

    def _deltas(self, events) -> list[Delta]:
        out = []
        for e in events:
            if self.max_calls is not None and getattr(e, "index", -1) >= self.max_calls:
                continue
            if isinstance(e, ContentDelta):
                self.content += e.text
                out.append(Delta(content=e.text))
            elif isinstance(e, ToolCallStart):
                out.append(Delta(tool_calls=[DeltaToolCall(index=e.index, id=e.id, type="function",
                                                           function=DeltaFunctionCall(name=e.name, arguments=""))]))
            elif isinstance(e, ToolCallArguments) and e.delta:
                out.append(Delta(tool_calls=[DeltaToolCall(index=e.index, function=DeltaFunctionCall(arguments=e.delta))]))
        return out

    def message(self) -> ResponseMessage:
        source = self.harmony or self.parser
        calls = (source.calls if source else [])[: self.max_calls]
        content = self.content
        if calls and not content.strip():
            content = None
        tool_calls = [ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments))
                      for c in calls] or None
        reasoning = (self.harmony or self.reasoning).reasoning_text
        return ResponseMessage(content=content, reasoning_content=reasoning, tool_calls=tool_calls)


def _check_json_output(text: str | None, fmt) -> APIError | None:
    """response_format is validated after generation, not constrained during it: a 422 when the output fails."""
    if fmt is None or fmt.type == "text":
        return None
    try:
        value = json.loads(text or "")
    except (ValueError, RecursionError):
        return APIError(422, f"response_format {fmt.type} is validated, not constrained, and the model's output is not "
                             f"valid JSON: {(text or '')[:200]!r}", param="response_format", code="invalid_json_output")
    if fmt.type == "json_object" and not isinstance(value, dict):
        return APIError(422, "response_format json_object is validated, not constrained, and the model's output is "
                             "JSON but not an object", param="response_format", code="invalid_json_output")
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema else None
    if schema is not None:
        problem = validate_json(value, schema)
        if problem:
            name = f" {fmt.json_schema.name!r}" if fmt.json_schema.name else ""
            return APIError(422, f"response_format json_schema is validated, not constrained, and the model's output "
                                 f"does not match the schema{name} {problem}", param="response_format",
                            code="json_schema_mismatch")
    return None


class ChatHandler:
    def __init__(self, service: GenerationService):
        self.svc = service

    def _formats(self) -> tuple[str, ...]:
        name = self.svc.settings.tool_parser
        return FORMATS if name == "auto" else ("hermes", "qwen3_coder") if name == "hermes" else (name,)

    def _tool_prefix(self, req: ChatCompletionRequest) -> str:
        """The forced start of the output for tool_choice "required" or a named function ("" otherwise)."""
        choice = req.tool_choice
        if choice is None or choice in ("auto", "none"):
            return ""
        if not req.tools:
            raise APIError(400, f"tool_choice {choice if isinstance(choice, str) else 'with a function name'} "
                                f"needs `tools`", param="tool_choice")
        name = None
        if not isinstance(choice, str):
            name = choice.function.name
            if name not in {t.function.name for t in req.tools}:
                raise APIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        tokenizer = self.svc.engine.tokenizer
        fmt = template_tool_format(tokenizer.chat_template if tokenizer else None, self.svc.settings.tool_parser)
        if fmt is None:
            raise APIError(400, "tool_choice \"required\" or a named function needs a chat template with a known "
                                "tool-call format (Hermes/Qwen <tool_call>, Qwen3-Coder <function=...>, Mistral "
                                "[TOOL_CALLS]); this model's template shows none: use \"auto\" or start the server "
                                "with --tool-parser", param="tool_choice", code="tool_choice_unsupported")
        return forced_prefix(fmt, name)

    def _prompt_ids(self, req: ChatCompletionRequest, prefix: str) -> tuple[list[int], bool]:
        """Template and tokens (CPU work, in the pool), and whether the output starts inside <think>. Tools go to
        the template even with tool_choice "none" (as in vLLM); "none" only turns parsing off. Thinking off
        (enable_thinking false, reasoning_effort "none") reaches the template; a generation prompt that opens
        <think> all the same, or before a forced tool call, gets it closed."""
        engine = self.svc.engine
        tk = engine.tokenizer
        kwargs = dict(req.chat_template_kwargs or {})
        if req.reasoning_effort == "none":
            kwargs.setdefault("enable_thinking", False)
        elif req.reasoning_effort:
            kwargs.setdefault("reasoning_effort", req.reasoning_effort)
        ids = chat_prompt_ids(tk, req.messages, req.tools or None, template_kwargs=kwargs,
                              limits=self.svc.render_limits, ctx_size=engine.ctx_size)
        thinking = prompt_opens_thinking(tk.decode(ids[-8:], skip_special_tokens=False))
        if thinking and (kwargs.get("enable_thinking") is False or prefix):
            ids, thinking = ids + tk.encode(CLOSE_THINKING, add_special_tokens=False), False
        return (ids + tk.encode(prefix, add_special_tokens=False) if prefix else ids), thinking

    async def __call__(self, req: ChatCompletionRequest, request: Request) -> Response:
        svc = self.svc
        svc.check_model(req.model)
        svc.check_n(req.n)
        prefix = self._tool_prefix(req)
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format json_schema needs a `json_schema` object", param="response_format")
            problem = check_schema(fmt.json_schema.schema_)
            if problem:
                raise APIError(400, f"response_format json_schema: {problem}", param="response_format")
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        n = req.n or 1
        params = [svc.sampling_params(req, max_tokens, logprobs, i) for i in range(n)]
        prompt_ids, thinking = await svc.cpu.run(self._prompt_ids, req, prefix)
        svc.check_context(prompt_ids, "messages")
        tools = tool_dicts(req.tools) if req.tools and req.tool_choice != "none" else None
        tokenizer = svc.engine.tokenizer
        harmony = is_harmony(tokenizer.chat_template if tokenizer else None)
        assemblers = [ChoiceAssembler(i, tokenizer, tools, self._formats(), bool(req.logprobs), prefix, thinking,
                                      1 if req.parallel_tool_calls is False else None, harmony) for i in range(n)]
        rid, created, model = new_id("chatcmpl"), now(), svc.settings.model_id
        if svc.settings.log_requests:
            choice = req.tool_choice if isinstance(req.tool_choice, (str, type(None))) else \
                f"function:{req.tool_choice.function.name}"
            log.info("chat %s: %d messages, %d tools, tool_choice=%s, stream=%s, include_usage=%s, "
                     "response_format=%s, prompt %d tokens, max_tokens=%s", rid, len(req.messages),
                     len(req.tools or []), choice, bool(req.stream),
                     bool(req.stream_options and req.stream_options.include_usage),
                     req.response_format.type if req.response_format else None, len(prompt_ids), max_tokens)
        first = svc.submit(prompt_ids, params[0])
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._stream(rid, created, model, prompt_ids, params, assemblers, first, include_usage,
                                  req.response_format)
            return sse_response(events, svc.settings.sse_ping_seconds)
        try:
            for i, a in enumerate(assemblers):
                job = first if i == 0 else svc.submit(prompt_ids, params[i])
                a.start()
                try:
                    for step in await svc.collect(job, request):
                        a.step(step)
                except ClientDisconnected:
                    log.info("chat %s: client disconnected, generation cancelled", rid)
                    return Response(status_code=499)
                except Exception as e:
                    raise engine_error(e, "messages") from None
                a.finish()
        finally:
            first.cancel()
        choices = [ChatChoice(index=a.index, message=a.message(), finish_reason=a.finish_reason,
                              logprobs=ChoiceLogprobs(content=a.logprobs) if req.logprobs else None) for a in assemblers]
        for c in choices:
            err = await svc.cpu.run(_check_json_output, c.message.content, req.response_format) \
                if req.response_format else None
            if err:
                raise err
        completion = sum(a.tokens for a in assemblers)
        usage = Usage.of(len(prompt_ids), completion, first.cached_tokens)
        body = ChatCompletion(id=rid, created=created, model=model, choices=choices, usage=usage)
        if svc.settings.log_requests:
            log.info("chat %s: %d tokens, finish %s, tool calls %s", rid, completion,
                     [a.finish_reason for a in assemblers], [len(c.message.tool_calls or []) for c in choices])
        return JSONResponse(body.model_dump())

    async def _stream(self, rid, created, model, prompt_ids, params, assemblers, first, include_usage, fmt):
        svc = self.svc

        def chunk(index, delta, finish=None, logprobs=None):
            c = ChatCompletionChunk(id=rid, created=created, model=model,
                                    choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish,
                                                         logprobs=logprobs)])
            return chunk_json(c, include_usage)

        job = first
        failed = False  # after an error event only [DONE] follows: no finish chunk, no usage chunk
        try:
            for i, a in enumerate(assemblers):
                if i > 0:
                    try:
                        job = svc.submit(prompt_ids, params[i])
                    except APIError as e:
                        yield error_event(e)
                        failed = True
                        break
                yield chunk(i, Delta(role="assistant", content=""))
                for d in a.start():
                    yield chunk(i, d)
                try:
                    async for step in job.steps():
                        for d in a.step(step):
                            yield chunk(i, d, logprobs=a.take_logprobs())
                except Exception as e:
                    try:
                        err = engine_error(e, "messages")
                    except Exception as inner:
                        log.exception("generation failed")
                        err = APIError(500, f"generation failed: {type(inner).__name__}: {inner}")
                    yield error_event(err)
                    failed = True
                    break
                for d in a.finish():
                    yield chunk(i, d, logprobs=a.take_logprobs())
                err = await svc.cpu.run(_check_json_output, a.message().content, fmt) if fmt else None
                if err:  # the content went out already; the error replaces the finish chunk
                    log.info("chat %s: %s", rid, err.message)
                    yield error_event(err)
                    failed = True
                    break
                yield chunk(i, Delta(), a.finish_reason, a.take_logprobs())
            if include_usage and not failed:
                completion = sum(a.tokens for a in assemblers)
                usage = Usage.of(len(prompt_ids), completion, first.cached_tokens)
                final = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
                yield chunk_json(final, True)
            yield DONE
            if svc.settings.log_requests:
                log.info("chat %s: streamed %d tokens, finish %s, tool calls %s", rid,
                         sum(a.tokens for a in assemblers), [a.finish_reason for a in assemblers],
                         [len(a.parser.calls) if a.parser else 0 for a in assemblers])
        except (asyncio.CancelledError, GeneratorExit):
            log.info("chat %s: client disconnected, generation cancelled", rid)
            raise
        finally:
            job.cancel()
