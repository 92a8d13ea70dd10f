"""A real ``fluxserve serve`` (worker in its own child process) or ``fluxserve worker`` in a
subprocess, which tests and the benchmarks kill -9 (or stop with SIGTERM) and start again on the
same data directory."""

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


class FluxserveProcess:
    """One ``fluxserve <command>`` subprocess on the tiny models, its data folder and a free port
    (given as ``port_setting``), logging to a file: started until /health answers 200, signalled,
    waited for, stopped."""

    command = ""  # serve | worker
    role = ""  # how messages name it
    port_setting = ""

    def __init__(self, data_dir: Path, tiny_root: Path | None = None, **env: str):
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        if tiny_root is not None and not (data_dir / "tiny-models").exists():
            (data_dir / "tiny-models").symlink_to(tiny_root, target_is_directory=True)
        self.env = {**os.environ, "FLUXSERVE_DATA_DIR": str(data_dir), "FLUXSERVE_MODELS": "tiny",
                    "FLUXSERVE_WORKER": "process", self.port_setting: str(self.port), "HF_HUB_OFFLINE": "1",
                    "FLUXSERVE_FETCH_ALLOW": '["127.0.0.1/32"]', **env}
        self.process: subprocess.Popen | None = None
        self.log_path = data_dir / self.log_name()

    def log_name(self) -> str:
        return f"{self.command}.log"

    def start(self, timeout: float = 120.0) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([FLUXSERVE, self.command, "--log-level", "warning"], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.role} exited: {self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.role} did not become healthy: {self.log()}")

    def _kill_and_wait_for(self, children: list[int]) -> None:
        """kill -9 the process, then wait (10 s at most) for its worker processes, which notice
        their parent is gone and exit by themselves."""
        assert self.process is not None, "not started"
        self.process.kill()
        self.process.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.1)

    def signal(self, signum: int = signal.SIGTERM) -> float:
        """Send ``signum`` to the process (not waiting); returns when it was sent (time.monotonic)."""
        assert self.process is not None, "not started"
        self.process.send_signal(signum)
        return time.monotonic()

    def terminate(self, timeout: float = 120.0) -> tuple[int, float]:
        """SIGTERM, then wait for the process to exit: (its exit status, seconds it took)."""
        sent = self.signal(signal.SIGTERM)
        return self.wait(timeout), time.monotonic() - sent

    def wait(self, timeout: float = 120.0) -> int:
        """The exit status once the process has exited (kill -9 after ``timeout``, and fail)."""
        assert self.process is not None, "not started"
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"{self.role} did not exit within {timeout:.0f}s: {self.log()}") from None

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


class ServerProcess(FluxserveProcess):
    """``fluxserve serve``: the API with its worker in a child process (or alone, --no-worker)."""

    command, role = "serve", "server"
    port_setting = "FLUXSERVE_PORT"

    def log_name(self) -> str:
        return "server.log"

    def create_key(self, name: str = "test", admin: bool = False) -> str:
        args = [FLUXSERVE, "keys", "create", name] + (["--admin"] if admin else [])
        return subprocess.run(args, env=self.env, check=True, capture_output=True, text=True).stdout.strip()

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
        children = []
        try:
            children = [self.worker_pid()]
        except (httpx.HTTPError, KeyError, TypeError):  # no answer, or no worker here (--no-worker)
            pass
        self._kill_and_wait_for(children)


class WorkerProcess(FluxserveProcess):
    """``fluxserve worker``: GPU workers alone, on the database and data folder given
    (``FLUXSERVE_DATABASE_URL``, ``FLUXSERVE_DATA_DIR``), with its small /health and /metrics
    port."""

    command, role = "worker", "worker"
    port_setting = "FLUXSERVE_WORKER_PORT"

    def log_name(self) -> str:
        return f"worker-{self.port}.log"

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.base_url}/health", timeout=5)

    def kill(self) -> None:
        """kill -9 the worker role; its worker processes notice their parent is gone and exit
        (waited for here, as for a server's worker)."""
        children: list[int] = []
        try:
            children = [one["pid"] for one in self.health().json()["worker"]["workers"] if one.get("pid")]
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        self._kill_and_wait_for(children)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still "exists": read its state
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
