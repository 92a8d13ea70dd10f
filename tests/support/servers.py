"""Real servers on loopback for tests: the fluxserve app under uvicorn in a thread, a plain
HTTP server holding init images, and an OpenAI-compatible chat endpoint (the prompt rewriter)."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from fluxserve.config import Settings
from fluxserve.jobs.database import open_database
from fluxserve.jobs.store import JobStore
from fluxserve.keys import KeyStore
from fluxserve.runtime import build_server_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    settings: Settings
    base_url: str
    key: str  # a user key
    other_key: str  # a second user's key
    admin_key: str
    jobs: JobStore
    keys: KeyStore

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kwargs)

    def job_count(self) -> int:
        from sqlalchemy import func, select

        from fluxserve.jobs.tables import Job

        with self.jobs._sessions() as session:
            return session.scalar(select(func.count()).select_from(Job))


@contextmanager
def live_server(data_dir: Path, tiny_root: Path, env_file: Path | None = None, **overrides) -> LiveServer:
    """Serve the tiny models from ``data_dir`` (reusing the tiny build at ``tiny_root``); with
    ``env_file``, update_server re-reads it."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "tiny-models"
    if not link.exists():
        link.symlink_to(tiny_root, target_is_directory=True)
    overrides.setdefault("worker", "thread")  # fast to start; process mode has its own tests
    overrides.setdefault("fetch_allow", ["127.0.0.1/32"])  # the test image host and receivers live on loopback
    settings = Settings(data_dir=data_dir, port=port, models="tiny", **overrides)
    sessions = open_database(settings.resolved_database_url)
    keys = KeyStore(sessions)
    fixed = dict(data_dir=data_dir, port=port, models="tiny", **overrides)
    reload = (lambda: Settings(_env_file=env_file, **fixed)) if env_file else None
    app = build_server_app(settings, reload_settings=reload)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    try:
        yield LiveServer(
            settings=settings, base_url=f"http://127.0.0.1:{port}", key=keys.create("test")[1],
            other_key=keys.create("other")[1], admin_key=keys.create("admin", admin=True)[1],
            jobs=JobStore(sessions), keys=keys,
        )
    finally:
        server.should_exit = True
        thread.join(30)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def static_server(directory: Path) -> str:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def chat_server(content: str):
    """An OpenAI-compatible chat completions endpoint that answers every request with ``content``;
    yields (its base URL, ending in /v1; the request bodies it got, in order)."""
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
