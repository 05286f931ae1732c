"""Server settings: what `moepage serve` flags configure, passed to create_app (no globals)."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    tool_parser: str = "auto"  # auto | hermes | qwen3_coder | mistral
    max_n: int = 8
    log_requests: bool = True
    # "exact", or the description of the approximate (elastic) routing mode the engine was started with
    # (`moepage serve --experts-per-token / --shared-only / --restrict-to-domain / --cache-aware-margin`)
    routing: str = "exact"

    def accepts_model(self, name: str | None) -> bool:
        return not name or name == self.model_id or name in self.model_aliases
