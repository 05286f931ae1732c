"""`moepage serve [MODEL]`: the OpenAI-compatible server (no MODEL: the built-in demo model)."""
from __future__ import annotations

import errno
import logging
import os
import socket
import sys

from moepage.cli import MODEL_HELP, add_engine_arguments, engine_config, size_argument
from moepage.commands.elastic_args import add_elastic_arguments, check_elastic_args, install_elastic
from moepage.paging.budget import parse_size


def register(sub):
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="MODEL is a local directory, a .gguf file or a Hugging Face repo id; "
                                   "without it a small built-in demo MoE is served.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: from the path)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--lazy", action="store_true",
                   help="owner/repo: download the resident weights, config and tokenizer now and each routed expert "
                        "on its first miss (HTTP range requests), kept in a disk tier under the HF cache")
    p.add_argument("--disk-budget", type=size_argument, default=None, metavar="SIZE",
                   help="with --lazy: bytes of experts the disk tier keeps, least recently used out first "
                        "(default: no limit)")
    p.add_argument("--api-key", action="append", default=[],
                   help="require `Authorization: Bearer KEY` (repeatable; default: $MOEPAGE_API_KEY if set)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable, or '*')")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait for the engine; more get 429")
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="requests generated at once, decoded together one token each a step (default 4); each "
                        "holds a KV cache of --ctx-size tokens inside --memory-budget")
    p.add_argument("--tool-parser", default="auto", choices=["auto", "hermes", "qwen3_coder", "mistral", "glm"],
                   help="tool-call format in the model's output (auto: all of them)")
    p.add_argument("--sse-ping", type=float, default=10.0, help="seconds between SSE comment pings on a silent stream")
    p.add_argument("--max-request-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="largest request body, e.g. 4MiB; larger ones get 413 (default: max(1 MiB, 16 bytes per "
                        "context token))")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without the API key (for scrapers); /health is always open")
    p.add_argument("--template-timeout", type=float, default=2.0, metavar="SECONDS",
                   help="longest one chat-template rendering may run; past it the request fails with 500")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="prefill every prompt from its first token (default: re-use the longest cached prefix)")
    p.add_argument("--prompt-cache-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="memory for earlier conversations' states, inside --memory-budget (default: one full "
                        "context's KV cache; under a budget at most half of what experts have beyond one token's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log verbosity (default info)")
    add_engine_arguments(p)
    add_elastic_arguments(p)
    p.set_defaults(func=run)


def settings_from_args(args, model_id: str, routing: str = "exact"):
    from moepage.server.settings import ServerSettings

    keys = tuple(args.api_key) or ((os.environ["MOEPAGE_API_KEY"],) if os.environ.get("MOEPAGE_API_KEY") else ())
    cors = [o for item in args.cors for o in item.split(",") if o]
    if args.max_queue < 0:
        raise ValueError("--max-queue must be >= 0")
    if getattr(args, "parallel", 1) < 1:
        raise ValueError("--parallel must be at least 1")
    if args.max_request_bytes is not None and args.max_request_bytes < 1:
        raise ValueError("--max-request-bytes must be at least 1 byte")
    if not args.template_timeout > 0:
        raise ValueError("--template-timeout must be > 0 seconds")
    return ServerSettings(model_id=args.served_model_name or model_id, host=args.host, port=args.port,
                          api_keys=keys, cors_origins=cors, max_queue=args.max_queue, tool_parser=args.tool_parser,
                          sse_ping_seconds=args.sse_ping, routing=routing, max_request_bytes=args.max_request_bytes,
                          metrics_public=args.metrics_public, template_timeout_seconds=args.template_timeout)


def prompt_cache_line(engine) -> str:
    from moepage.paging.budget import human

    pc = engine.prompt_cache
    if pc is None:
        return "prompt cache: off (--no-prompt-cache)"
    return (f"prompt cache: {human(pc.capacity)} (--prompt-cache-bytes) for earlier conversations; prompts re-use "
            f"their longest cached prefix, cut where a prefill chunk ends (every {pc.schedule.chunk} tokens and after "
            f"each end-of-turn token; the same tokens as without it)")


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (uvicorn listens on it): a port in use fails here, before the model loads."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)  # as uvicorn does
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "the address is already in use (another server? choose another --port)" \
            if e.errno == errno.EADDRINUSE else e.strerror
        raise OSError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings_from_args(args, "")  # bad flags, contradictory ones, then a port in use fail before the (slow) load
    if getattr(args, "disk_budget", None) is not None and not args.lazy:
        raise ValueError("--disk-budget sets the disk tier of --lazy; without --lazy every expert is on disk already")
    check_elastic_args(args)
    sock = bind_socket(args.host, args.port)
    try:
        return _serve(args, sock)
    finally:
        sock.close()


def _serve(args, sock: socket.socket) -> int:
    import uvicorn

    from moepage.engine.engine import Engine
    from moepage.server.app import create_app
    from moepage.server.discovery import context_warning
    from moepage.server.model_source import resolve_model

    resolved = resolve_model(args.model, args.revision, lazy=args.lazy)
    settings = settings_from_args(args, resolved.model_id)
    print(f"moepage serve: loading {resolved.path} ({resolved.kind})", file=sys.stderr)
    config = engine_config(args, resolved.path)
    config.prefix_cache = not args.no_prompt_cache
    config.prompt_cache_bytes = args.prompt_cache_bytes
    config.parallel = args.parallel
    if args.lazy:
        config.preload = False  # experts come from the Hub when first used, not all at start-up
    engine = Engine.load(config)
    if args.lazy:
        from moepage.paging.hub_source import configure_disk_tier

        print(configure_disk_tier(engine.ckpt.experts, args.disk_budget, engine.args.moe_layers, args.io_threads),
              file=sys.stderr)
    print(engine.memory_summary(), file=sys.stderr)
    print(prompt_cache_line(engine), file=sys.stderr)
    warning = context_warning(args.ctx_size, engine.args.max_position_embeddings)
    if warning:
        print(warning, file=sys.stderr)
    try:
        elastic, line = install_elastic(engine, args)
    except (ValueError, OSError):
        engine.close()
        raise
    print(line, file=sys.stderr)
    settings.routing = "exact" if elastic.is_default else elastic.describe()
    app = create_app(engine, settings)
    print(f"serving `{settings.model_id}` at http://{settings.host}:{settings.port}/v1 "
          f"(context {engine.ctx_size} tokens{', API key required' if settings.api_keys else ''})", file=sys.stderr)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        print("warning: listening beyond this machine without --api-key", file=sys.stderr)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_seconds)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
    return 0
