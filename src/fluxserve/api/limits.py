"""Request limits: body size and upload time (an ASGI middleware that reads the body before the
app sees it), and rate limits per client address and per key (the ``limits`` library, moving
window, in memory: per server process)."""

from __future__ import annotations

import asyncio
import json
import math
import time

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxserve.api.errors import OPENAI_PREFIX, ApiError, render_error


async def _send_error(scope: Scope, send: Send, status: int, message: str, **details) -> None:
    """A refusal before the app runs, in the shape of the API the path belongs to (``errors``)."""
    answer, headers = render_error(scope["path"], status, message, **details)
    body = json.dumps(answer).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]
                + [(name.lower().encode(), value.encode()) for name, value in headers.items()]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Bodies over ``max_bytes`` get 413 (by Content-Length, or while streaming); a client that
    takes longer than ``timeout`` to send its body gets 408. The app then reads the buffered body."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_error(scope, send, 413, f"Request body too large (at most {self.max_bytes} bytes)")
            return
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await _send_error(scope, send, 408, f"Request body not received within {self.timeout:g} seconds")
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(scope, send, 413, f"Request body too large (at most {self.max_bytes} bytes)")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)


class RateLimits:
    def __init__(self, per_key: str, per_address: str):
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.per_key = parse(per_key) if per_key else None
        self.per_address = parse(per_address) if per_address else None

    def _hit(self, item, scope: str, ident: str, who: str) -> None:
        if item is None or self._limiter.hit(item, scope, ident):
            return
        reset = self._limiter.get_window_stats(item, scope, ident).reset_time
        raise ApiError(429, f"Rate limit exceeded: at most {item} per {who}.",
                       retry_after=max(1, math.ceil(reset - time.time())))

    def check_address(self, address: str) -> None:
        self._hit(self.per_address, "address", address, "client address")

    def check_key(self, key_id: int) -> None:
        self._hit(self.per_key, "key", str(key_id), "key")


class AddressRateLimitMiddleware:
    """Counts every /api/ and /v1/ request by client address, before authentication (so guessing
    keys is throttled too)."""

    def __init__(self, app: ASGIApp, limits: RateLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/api/", OPENAI_PREFIX)):
            client = scope.get("client")
            try:
                self.limits.check_address(client[0] if client else "unknown")
            except ApiError as exc:
                await _send_error(scope, send, exc.status_code, exc.message, param=exc.param, code=exc.code,
                                  headers=exc.headers, **exc.extra)
                return
        await self.app(scope, receive, send)
