"""Server settings: what `moepage serve` flags configure, passed to create_app (no globals)."""
from __future__ import annotations

from dataclasses import dataclass, field

MIN_REQUEST_BYTES = 1 << 20
REQUEST_BYTES_PER_TOKEN = 16


def default_max_request_bytes(ctx_size: int) -> int:
    """max(1 MiB, 16 bytes per context token): room for a full context of JSON-escaped text and tool definitions."""
    return max(MIN_REQUEST_BYTES, REQUEST_BYTES_PER_TOKEN * ctx_size)


@dataclass
class ServerSettings:
    model_id: str = "moepage"
    model_aliases: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    cors_origins: list[str] = field(default_factory=list)
    max_queue: int = 16  # requests waiting behind the running one; more get 429
    retry_after_seconds: int = 2
    sse_ping_seconds: float = 10.0  # SSE comment pings while a stream is silent (queue wait, long prefill)
    tool_parser: str = "auto"  # auto | hermes | qwen3_coder | mistral | glm
    max_n: int = 8
    log_requests: bool = True
    # "exact", or the description of the approximate (elastic) routing mode the engine was started with
    # (`moepage serve --experts-per-token / --shared-only / --restrict-to-domain / --cache-aware-margin`)
    routing: str = "exact"
    max_request_bytes: int | None = None  # request body limit (413 beyond); None: default_max_request_bytes(ctx)
    metrics_public: bool = False  # /metrics without the API key (for scrapers); /health is always open
    template_timeout_seconds: float = 2.0  # one chat-template rendering; past it the request fails (500)
    cpu_workers: int = 2  # threads for templates, tokenization and validation, off the event loop
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # length of one stop string
    shutdown_grace_seconds: float = 2.0  # on SIGTERM, how long running requests may finish before they are cut

    def accepts_model(self, name: str | None) -> bool:
        return not name or name == self.model_id or name in self.model_aliases
