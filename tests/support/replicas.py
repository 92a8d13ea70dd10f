"""Several fluxserve processes' worth of roles in one test: API replicas without a worker (each
with its own data dir, under uvicorn on loopback, with the database listener on PostgreSQL, as
``runtime.build_server_app`` wires it) and workers on "other nodes" (own data dir, the tiny
engine, a thread). They share what a cluster shares: the database URL and the S3 bucket."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from fluxserve.api.app import create_app
from fluxserve.config import Settings
from fluxserve.events import JobEvents
from fluxserve.jobs.database import open_database
from fluxserve.jobs.store import JobStore
from fluxserve.runtime import build_listener, build_registry, build_storage, build_worker
from tests.support.servers import free_port


@dataclass
class Replica:
    settings: Settings
    base_url: str
    events: JobEvents
    jobs: JobStore
    listener: object | None  # jobs.notify.JobNotifications on PostgreSQL

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kwargs)


def _settings(data_dir: Path, tiny_root: Path, **overrides) -> Settings:
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "tiny-models"
    if not link.exists():
        link.symlink_to(tiny_root, target_is_directory=True)
    overrides.setdefault("fetch_allow", ["127.0.0.1/32"])
    overrides.setdefault("port", free_port())
    return Settings(data_dir=data_dir, models="tiny", worker="thread", **overrides)


@contextmanager
def api_replica(data_dir: Path, tiny_root: Path, *, listen: bool = True, **overrides) -> Iterator[Replica]:
    """An API process without a worker. ``listen=False``: no database listener (waiters poll)."""
    settings = _settings(data_dir, tiny_root, **overrides)
    sessions = open_database(settings.resolved_database_url)
    events = JobEvents()
    listener = build_listener(settings, events) if listen else None
    app = create_app(settings, build_registry(settings, build_tiny=False), events=events, sessions=sessions,
                     storage_configs=build_storage(settings, sessions),
                     on_startup=listener.start if listener else None,
                     on_shutdown=listener.stop if listener else None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test replica did not start")
        time.sleep(0.05)
    try:
        if listener is not None:
            assert listener.wait_connected(20), "the replica's database listener did not connect"
        yield Replica(settings, f"http://127.0.0.1:{settings.port}", events, JobStore(sessions), listener)
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def worker_node(data_dir: Path, tiny_root: Path, **overrides) -> Iterator[object]:
    """A worker with a data dir of its own (another node's disk), running the tiny engine."""
    settings = _settings(data_dir, tiny_root, **overrides)
    worker = build_worker(settings)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(30)
