"""Request bodies bounded while they are read: a pure ASGI middleware counting the bytes of `http.request` messages
(and checking Content-Length first); 413 `request_too_large` in OpenAI format beyond the limit."""
from __future__ import annotations

import ctypes
import ctypes.util

import anyio
from starlette.exceptions import HTTPException

from moepage.server.errors import APIError

DRAIN_FACTOR = 8  # an over-limit body is read and dropped up to this many limits, so the client sees the 413
TRIM_AFTER_BYTES = 256 * 1024  # after a body this large, freed heap pages go back to the OS


class RequestTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return (f"the request body is larger than this server's limit of {limit} bytes; send less, or start the server "
            f"with a larger --max-request-bytes")


def too_large(limit: int) -> APIError:
    return APIError(413, too_large_message(limit), code="request_too_large")


def _malloc_trim():
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return lambda: trim(0)


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.trim = _malloc_trim()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._drain(receive, int(length) if length.isdigit() else 0)
            return await too_large(self.max_bytes).response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body"):
                        await self._drain(receive, received)
                    raise RequestTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            if received > TRIM_AFTER_BYTES and self.trim is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.trim)

    async def _drain(self, receive, announced: int):
        """Read and drop the body (bounded), so the client is not cut off mid-upload before it reads the 413."""
        if announced > DRAIN_FACTOR * self.max_bytes:
            return
        dropped = 0
        while dropped <= DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body"):
                return
