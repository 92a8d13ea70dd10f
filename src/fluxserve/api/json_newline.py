"""Every JSON answer ends with a newline, so that ``curl`` output doesn't glue the shell prompt
to it. ``JsonNewlineMiddleware`` does it for every route (JSONResponse built anywhere, FastAPI's
own answers, the middleware refusals of ``api.limits``), fixing ``Content-Length``; event
streams and files are passed through untouched (only ``application/json`` bodies are read).
``NewlineJSONResponse`` does it by itself, for the answers Starlette sends from outside every
middleware (the 500 of an unhandled error)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class NewlineJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return super().render(content) + b"\n"


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    values = {name.lower(): value for name, value in headers}
    if b"content-encoding" in values:  # compressed: not ours to touch
        return False
    media_type = values.get(b"content-type", b"").split(b";")[0].strip().lower()
    return media_type == b"application/json" or media_type.endswith(b"+json")


class JsonNewlineMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_with_newline(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if _is_json(list(message.get("headers", []))):
                    start = message  # held until the whole body is here: its length changes
                    return
                await send(message)
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(chunks)
                if not body.endswith(b"\n"):
                    body += b"\n"
                headers = [(name, value) for name, value in start.get("headers", []) if name.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            else:
                await send(message)

        await self.app(scope, receive, send_with_newline)
