"""Treat every POST body under /api/ as JSON whatever its Content-Type, as ModelsLab does:
``curl -d '{...}'`` (form content type) and clients that send text/plain work unchanged."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class JsonBodiesMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/api/"):
            headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)
