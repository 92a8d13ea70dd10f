"""A real ``fluxserve serve`` in a subprocess (worker in its own child process), which tests and
the reliability benchmark kill -9 (or stop with SIGTERM) and start again on the same data
directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.servers import free_port

FLUXSERVE = str(Path(sys.executable).parent / "fluxserve")


class ServerProcess:
    def __init__(self, data_dir: Path, tiny_root: Path | None = None, **env: str):
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        if tiny_root is not None and not (data_dir / "tiny-models").exists():
            (data_dir / "tiny-models").symlink_to(tiny_root, target_is_directory=True)
        self.env = {**os.environ, "FLUXSERVE_DATA_DIR": str(data_dir), "FLUXSERVE_MODELS": "tiny",
                    "FLUXSERVE_WORKER": "process", "FLUXSERVE_PORT": str(self.port), "HF_HUB_OFFLINE": "1",
                    "FLUXSERVE_FETCH_ALLOW": '["127.0.0.1/32"]', **env}
        self.process: subprocess.Popen | None = None
        self.log_path = data_dir / "server.log"

    def create_key(self, name: str = "test", admin: bool = False) -> str:
        args = [FLUXSERVE, "keys", "create", name] + (["--admin"] if admin else [])
        return subprocess.run(args, env=self.env, check=True, capture_output=True, text=True).stdout.strip()

    def start(self, timeout: float = 120.0) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([FLUXSERVE, "serve", "--log-level", "warning"], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()}")
            try:
                health = httpx.get(f"{self.base_url}/health", timeout=2)
                if health.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not become healthy: {self.log()}")

    def health(self) -> dict:
        return httpx.get(f"{self.base_url}/health", timeout=5).json()

    def worker_pid(self) -> int:
        return self.health()["worker"]["pid"]

    def kill_worker(self, timeout: float = 60.0) -> int:
        """kill -9 the worker process (waiting first until one is alive: it may be restarting)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            worker = self.health()["worker"]
            if worker["alive"]:
                try:
                    os.kill(worker["pid"], signal.SIGKILL)
                    return worker["pid"]
                except ProcessLookupError:
                    pass  # died between the two calls; wait for its successor
            time.sleep(0.1)
        raise RuntimeError("no live worker to kill")

    def kill(self) -> None:
        """kill -9 the server; its worker child notices its parent is gone and exits."""
        worker = None
        try:
            worker = self.worker_pid()
        except (httpx.HTTPError, KeyError, TypeError):  # no answer, or no worker here (--no-worker)
            pass
        self.process.kill()
        self.process.wait(10)
        if worker is not None:  # wait for the orphaned worker to exit by itself
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(worker):
                time.sleep(0.1)

    def signal(self, signum: int = signal.SIGTERM) -> float:
        """Send ``signum`` to the server (not waiting); returns when it was sent (time.monotonic)."""
        assert self.process is not None, "not started"
        self.process.send_signal(signum)
        return time.monotonic()

    def terminate(self, timeout: float = 120.0) -> tuple[int, float]:
        """SIGTERM, then wait for the server to exit: (its exit status, seconds it took)."""
        sent = self.signal(signal.SIGTERM)
        return self.wait(timeout), time.monotonic() - sent

    def wait(self, timeout: float = 120.0) -> int:
        """The server's exit status once it has exited (kill -9 after ``timeout``, and fail)."""
        assert self.process is not None, "not started"
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"server did not exit within {timeout:.0f}s: {self.log()}") from None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still "exists": read its state
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class WorkerProcess:
    """A real ``fluxserve worker`` in a subprocess: GPU workers alone, on the database and data
    folder given (``FLUXSERVE_DATABASE_URL``, ``FLUXSERVE_DATA_DIR``), with its small
    /health and /metrics port."""

    def __init__(self, data_dir: Path, tiny_root: Path | None = None, **env: str):
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        if tiny_root is not None and not (data_dir / "tiny-models").exists():
            (data_dir / "tiny-models").symlink_to(tiny_root, target_is_directory=True)
        self.env = {**os.environ, "FLUXSERVE_DATA_DIR": str(data_dir), "FLUXSERVE_MODELS": "tiny",
                    "FLUXSERVE_WORKER": "process", "FLUXSERVE_WORKER_PORT": str(self.port), "HF_HUB_OFFLINE": "1",
                    "FLUXSERVE_FETCH_ALLOW": '["127.0.0.1/32"]', **env}
        self.process: subprocess.Popen | None = None
        self.log_path = data_dir / f"worker-{self.port}.log"

    def start(self, timeout: float = 120.0) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([FLUXSERVE, "worker", "--log-level", "warning"], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"worker did not become healthy: {self.log()}")

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.base_url}/health", timeout=5)

    def kill(self) -> None:
        """kill -9 the worker role; its worker processes notice their parent is gone and exit
        (waited for here, as for a server's worker)."""
        assert self.process is not None, "not started"
        children: list[int] = []
        try:
            children = [one["pid"] for one in self.health().json()["worker"]["workers"] if one.get("pid")]
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        self.process.kill()
        self.process.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.1)

    def signal(self, signum: int = signal.SIGTERM) -> float:
        assert self.process is not None, "not started"
        self.process.send_signal(signum)
        return time.monotonic()

    def wait(self, timeout: float = 120.0) -> int:
        assert self.process is not None, "not started"
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"worker did not exit within {timeout:.0f}s: {self.log()}") from None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
