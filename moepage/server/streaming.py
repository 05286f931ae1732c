"""Server-sent events: OpenAI chunk framing, `data: [DONE]`, comment pings while a stream is silent."""
from __future__ import annotations

import json
from typing import AsyncIterator

from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

from moepage.server.errors import APIError

DONE = "[DONE]"


def chunk_json(chunk: BaseModel, include_usage: bool) -> str:
    data = chunk.model_dump()
    for choice in data.get("choices", []):
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            for call in choice["delta"].get("tool_calls", []):
                for k in [k for k, v in call.items() if v is None]:
                    del call[k]
                call["function"] = {k: v for k, v in call["function"].items() if v is not None}
    if not include_usage:
        data.pop("usage", None)
    return json.dumps(data, ensure_ascii=False)


def error_event(err: APIError) -> str:
    return json.dumps(err.body(), ensure_ascii=False)


def sse_response(events: AsyncIterator[str], ping_seconds: float) -> EventSourceResponse:
    """Headers go out at once; `: ping` comments keep the socket busy during queueing and long prefills."""
    return EventSourceResponse(
        ({"data": e} async for e in events), ping=ping_seconds if ping_seconds > 0 else None, sep="\n",
        headers={"Cache-Control": "no-cache"},
    )
