"""create_app(engine, settings): the FastAPI application (routes, auth, CORS, metrics, the engine worker)."""
from __future__ import annotations

import secrets
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from moepage.engine.engine import Engine
from moepage.server.body_limit import BodyLimitMiddleware
from moepage.server.chat import ChatHandler
from moepage.server.completions import CompletionHandler
from moepage.server.cpu_pool import CpuPool
from moepage.server.discovery import model_card, props
from moepage.server.errors import APIError, bad_request, install_error_handlers
from moepage.server.generation import GenerationService
from moepage.server.metrics import EngineCollector, RequestMetrics
from moepage.server.prompts import chat_prompt_ids, encode_bounded, require_tokenizer
from moepage.server.protocol import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
    ErrorResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse, now,
)
from moepage.server.settings import ServerSettings, default_max_request_bytes
from moepage.server.worker import EngineWorker

ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          413: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 500: {"model": ErrorResponse},
          503: {"model": ErrorResponse}}


def _auth(settings: ServerSettings):
    async def check(request: Request):
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(token.strip(), k) for k in settings.api_keys):
            raise APIError(401, "Incorrect API key provided. Send `Authorization: Bearer <key>` with the key given "
                                "to `moepage serve --api-key`.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, settings.model_id)
    worker = EngineWorker(engine, settings.max_queue, on_finished=metrics.observe_job)
    registry.register(EngineCollector(engine, worker, settings.model_id))
    cpu = CpuPool(settings.cpu_workers)
    max_request_bytes = settings.max_request_bytes or default_max_request_bytes(engine.ctx_size)
    service = GenerationService(engine, worker, metrics, settings, cpu, max_request_bytes)
    chat, completions = ChatHandler(service), CompletionHandler(service)
    created = now()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        cpu.close()
        worker.stop()

    # the docs and schema routes are added below, behind the API key like the rest
    app = FastAPI(title="moepage", description="OpenAI-compatible server for Mixture-of-Experts models paged from disk",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings, app.state.worker, app.state.registry = engine, settings, worker, registry
    app.state.cpu, app.state.max_request_bytes = cpu, max_request_bytes
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in settings.cors_origins)
    auth = [Depends(_auth(settings))]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "requests_running": worker.running,
                "requests_waiting": worker.waiting}

    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", dependencies=[] if settings.metrics_public else auth)
    async def metrics_endpoint():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi():
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=auth, include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="moepage API")

    @app.get("/redoc", dependencies=auth, include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title="moepage API")

    def card() -> ModelCard:
        return model_card(engine, settings, created)

    @app.get("/props", dependencies=auth, responses=ERRORS)
    async def llama_server_props():
        return props(engine, settings)

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, responses=ERRORS)
    async def models():
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=auth, responses=ERRORS)
    async def model(model_id: str):
        service.check_model(model_id or None)
        return card()

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=auth, responses=ERRORS)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await chat(req, request)

    @app.post("/v1/completions", response_model=Completion, dependencies=auth, responses=ERRORS)
    async def text_completions(req: CompletionRequest, request: Request):
        return await completions(req, request)

    def tokens_of(req: TokenizeRequest) -> list[int]:
        if req.messages is not None:
            return chat_prompt_ids(engine.tokenizer, req.messages, req.tools,
                                   add_generation_prompt=req.add_generation_prompt is not False,
                                   limits=service.render_limits, ctx_size=engine.ctx_size)
        return encode_bounded(require_tokenizer(engine.tokenizer), req.prompt, engine.ctx_size, "prompt",
                              add_special_tokens=req.add_special_tokens is not False)

    @app.post("/tokenize", response_model=TokenizeResponse, dependencies=auth, responses=ERRORS)
    async def tokenize(req: TokenizeRequest):
        service.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of `prompt` or `messages`")
        ids = await cpu.run(tokens_of, req)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.ctx_size)

    @app.post("/detokenize", response_model=DetokenizeResponse, dependencies=auth, responses=ERRORS)
    async def detokenize(req: DetokenizeRequest):
        service.check_model(req.model)
        bad = next((t for t in req.tokens if t >= engine.args.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0..{engine.args.vocab_size - 1})",
                              param="tokens")
        return DetokenizeResponse(prompt=await cpu.run(require_tokenizer(engine.tokenizer).decode, req.tokens))

    return app
