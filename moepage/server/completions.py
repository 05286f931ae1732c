"""POST /v1/completions: raw prompts (text, texts, token ids), fill-in-the-middle `suffix`, echo, logprobs."""
from __future__ import annotations

import asyncio
import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from moepage.engine.engine import StepOutput
from moepage.server.errors import APIError, bad_request
from moepage.server.generation import ClientDisconnected, GenerationService, engine_error
from moepage.server.prompts import completion_prompts
from moepage.server.protocol import (
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage, new_id, now,
)
from moepage.server.streaming import DONE, chunk_json, error_event, sse_response

log = logging.getLogger("moepage.server")


class LogprobBuilder:
    def __init__(self, tokenizer, offset: int):
        self.tk = tokenizer
        self.offset = offset
        self.lp = CompletionLogprobs()

    def _text(self, t: int) -> str:
        return self.tk.decode([t], skip_special_tokens=False) if self.tk else str(t)

    def add(self, step: StepOutput, text: str):
        self.lp.tokens.append(self._text(step.token))
        self.lp.token_logprobs.append(step.logprob)
        self.lp.top_logprobs.append({self._text(t): lp for t, lp in (step.top_logprobs or [])} or None)
        self.lp.text_offset.append(self.offset)
        self.offset += len(text)

    def take(self) -> CompletionLogprobs:
        out, self.lp = self.lp, CompletionLogprobs()
        return out


class CompletionHandler:
    def __init__(self, service: GenerationService):
        self.svc = service

    def _prepare(self, req: CompletionRequest):
        """Checks, token ids and sampling parameters of each choice (CPU work, in the pool)."""
        svc = self.svc
        svc.check_model(req.model)
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise bad_request("best_of other than n is not supported", param="best_of")
        if req.suffix is not None and req.echo:
            raise bad_request("echo and suffix cannot be used together", param="echo")
        prompts = completion_prompts(svc.engine.tokenizer, req.prompt, req.suffix, svc.vocab_size, svc.engine.ctx_size)
        svc.check_n(len(prompts) * n)
        for ids in prompts:
            svc.check_context(ids, "prompt")
        logprobs = req.logprobs
        jobs = [(p, ids, svc.sampling_params(req, req.max_tokens, logprobs, j)) for p, ids in enumerate(prompts)
                for j in range(n)]
        return jobs

    def _echo(self, req: CompletionRequest, ids: list[int]) -> str:
        if not req.echo:
            return ""
        tk = self.svc.engine.tokenizer
        if isinstance(req.prompt, str):
            return req.prompt
        return tk.decode(ids, skip_special_tokens=False) if tk else ""

    async def __call__(self, req: CompletionRequest, request: Request) -> Response:
        svc = self.svc
        jobs = await svc.cpu.run(self._prepare, req)
        rid, created, model = new_id("cmpl"), now(), svc.settings.model_id
        if svc.settings.log_requests:
            log.info("completion %s: %d prompts x %d, stream=%s, suffix=%s", rid, len(jobs) // (req.n or 1),
                     req.n or 1, bool(req.stream), req.suffix is not None)
        first = svc.submit(jobs[0][1], jobs[0][2])
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse_response(self._stream(req, rid, created, model, jobs, first, include_usage),
                                svc.settings.sse_ping_seconds)
        choices, prompt_tokens, completion_tokens, cached_tokens = [], 0, 0, 0
        try:
            for index, (p, ids, params) in enumerate(jobs):
                job = first if index == 0 else svc.submit(ids, params)
                try:
                    steps = await svc.collect(job, request)
                except ClientDisconnected:
                    return Response(status_code=499)
                except Exception as e:
                    raise engine_error(e, "prompt") from None
                echo = self._echo(req, ids)
                lp = LogprobBuilder(svc.engine.tokenizer, len(echo)) if req.logprobs is not None else None
                for s in steps:
                    if lp:
                        lp.add(s, s.text)
                finish = steps[-1].finish_reason if steps else None
                choices.append(CompletionChoice(index=index, text=echo + "".join(s.text for s in steps),
                                                logprobs=lp.take() if lp else None, finish_reason=finish))
                prompt_tokens += len(ids)
                completion_tokens += len(steps)
                cached_tokens += job.cached_tokens
        finally:
            first.cancel()
        usage = Usage.of(prompt_tokens, completion_tokens, cached_tokens)
        return JSONResponse(Completion(id=rid, created=created, model=model, choices=choices, usage=usage).model_dump())

    async def _stream(self, req, rid, created, model, jobs, first, include_usage):
        svc = self.svc
        job = first
        prompt_tokens = completion_tokens = cached_tokens = 0

        def chunk(index, text, finish=None, logprobs=None):
            c = Completion(id=rid, created=created, model=model,
                           choices=[CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)])
            return chunk_json(c, include_usage)

        try:
            for index, (p, ids, params) in enumerate(jobs):
                if index > 0:
                    try:
                        job = svc.submit(ids, params)
                    except APIError as e:
                        yield error_event(e)
                        break
                echo = self._echo(req, ids)
                if echo:
                    yield chunk(index, echo)
                lp = LogprobBuilder(svc.engine.tokenizer, len(echo)) if req.logprobs is not None else None
                prompt_tokens += len(ids)
                try:
                    async for s in job.steps():
                        completion_tokens += 1
                        if lp:
                            lp.add(s, s.text)
                        if s.text or s.finish_reason or lp:
                            yield chunk(index, s.text, s.finish_reason, lp.take() if lp else None)
                except Exception as e:
                    try:
                        err = engine_error(e, "prompt")
                    except Exception as inner:
                        err = APIError(500, f"generation failed: {type(inner).__name__}: {inner}")
                    yield error_event(err)
                    break
                cached_tokens += job.cached_tokens
            if include_usage:
                usage = Usage.of(prompt_tokens, completion_tokens, cached_tokens)
                yield chunk_json(Completion(id=rid, created=created, model=model, choices=[], usage=usage), True)
            yield DONE
        except (asyncio.CancelledError, GeneratorExit):
            log.info("completion %s: client disconnected, generation cancelled", rid)
            raise
        finally:
            job.cancel()
