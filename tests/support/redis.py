"""A real, throwaway Redis server for tests: Debian's ``redis-server`` on 127.0.0.1 (a free
port), no persistence, its files in a temp dir, stopped afterwards. Missing binary: the tests
that need it skip, unless ``FLUXSERVE_REQUIRE_REDIS=1`` (CI) makes that a failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REQUIRE_ENV = "FLUXSERVE_REQUIRE_REDIS"


class RedisUnavailable(RuntimeError):
    """No redis-server binary on this machine."""


def redis_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, process: subprocess.Popen, port: int):
        self.process, self.port = process, port
        self.url = f"redis://127.0.0.1:{port}/0"


@contextmanager
def running_redis(tmp_dir: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable("redis-server not found (install it with: apt-get install -y redis-server)")
    port = _free_port()
    folder = Path(tmp_dir) / f"redis-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder), "--save", "",
         "--appendonly", "no", "--protected-mode", "yes", "--logfile", str(folder / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not _ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                log = (folder / "redis.log").read_text(errors="replace")[-2000:] if (folder / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server did not start:\n{log}")
            time.sleep(0.05)
        yield RedisServer(process, port)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
