"""Request limits: body size and upload time (an ASGI middleware that reads the body before the
app sees it), and rate limits per client address and per key (the ``limits`` library, moving
window: in memory, per server process; or, with ``FLUXSERVE_REDIS_URL``, in Redis, shared by
every API replica)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluxserve.api.errors import OPENAI_PREFIX, ApiError, render_error

log = logging.getLogger(__name__)
STORAGE_WARNING_SECONDS = 60.0  # one warning a minute while the shared counters can't be reached
REDIS_TIMEOUT_SECONDS = 0.5  # a Redis that does not answer in this time lets the request through


def limits_storage_url(redis_url: str) -> str:
    """``FLUXSERVE_REDIS_URL`` (redis://, rediss://, redis+unix://) as the ``limits`` library's
    asyncio storage URL, which uses redis-py's asyncio client (no blocking of the event loop)."""
    return "async+" + redis_url


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
    """Moving-window limits per key and per client address. With ``storage_url`` (a Redis URL)
    the counters live there, so N replicas together allow what one would; if Redis can't be
    reached the request is let through (logged once a minute): an outage of the limiter's store
    does not become an outage of the API."""

    def __init__(self, per_key: str, per_address: str, storage_url: str | None = None):
        self.storage = storage_from_string(
            limits_storage_url(storage_url), implementation="redispy", wrap_exceptions=True,
            socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        ) if storage_url else MemoryStorage()
        self.shared = storage_url is not None
        self._limiter = MovingWindowRateLimiter(self.storage)
        self.per_key = parse(per_key) if per_key else None
        self.per_address = parse(per_address) if per_address else None
        self._warned_at = -STORAGE_WARNING_SECONDS

    async def _hit(self, item, scope: str, ident: str, who: str) -> None:
        if item is None:
            return
        try:
            if await self._limiter.hit(item, scope, ident):
                return
            reset = (await self._limiter.get_window_stats(item, scope, ident)).reset_time
        except StorageError as exc:  # Redis away: let it through (the limit is protection, not the service)
            now = time.monotonic()
            if now - self._warned_at >= STORAGE_WARNING_SECONDS:
                self._warned_at = now
                log.warning("rate limits not applied: their Redis store is unavailable (%s)", exc.storage_error)
            return
        raise ApiError(429, f"Rate limit exceeded: at most {item} per {who}.",
                       retry_after=max(1, math.ceil(reset - time.time())))

    async def check_address(self, address: str) -> None:
        await self._hit(self.per_address, "address", address, "client address")

    async def check_key(self, key_id: int) -> None:
        await self._hit(self.per_key, "key", str(key_id), "key")


class AddressRateLimitMiddleware:
    """Counts every /api/ and /v1/ request by client address, before authentication (so guessing
    keys is throttled too)."""

    def __init__(self, app: ASGIApp, limits: RateLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/api/", OPENAI_PREFIX)):
            client = scope.get("client")
            try:
                await self.limits.check_address(client[0] if client else "unknown")
            except ApiError as exc:
                await _send_error(scope, send, exc.status_code, exc.message, param=exc.param, code=exc.code,
                                  headers=exc.headers, **exc.extra)
                return
        await self.app(scope, receive, send)
