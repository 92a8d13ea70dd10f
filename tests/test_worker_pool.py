"""One worker process per GPU (``FLUXSERVE_GPUS``, ``supervisor.WorkerPool``): a real
``fluxserve serve`` told of two GPUs on this CPU machine starts two worker processes, each with
its own CUDA_VISIBLE_DEVICES (as each reports it from its own environment), both generating at
once; killing one restarts it alone. Then the pool's own logic with fake hosts."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import httpx
from sqlalchemy import select

from fluxserve.jobs.database import open_database
from fluxserve.jobs.tables import WorkerRow
from fluxserve.supervisor import WorkerPool
from tests.support.process_server import ServerProcess
from tests.support.waiting import wait_for_job, wait_until

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
DETAILS = "/api/v1/enterprise/flux_klein/system_details"
BODY = {"prompt": "a lighthouse", "width": 384, "height": 384, "num_inference_steps": 12, "safety_checker": False,
        "instant_response": True}


def test_two_gpus_two_worker_processes_each_on_its_gpu_concurrent_and_restarted_alone(tmp_path, tiny_root):
    server = ServerProcess(tmp_path / "data", tiny_root, FLUXSERVE_GPUS="0,1", FLUXSERVE_DEVICE="cpu",
                           FLUXSERVE_HEARTBEAT_SECONDS="0.5")
    server.start()
    sessions = open_database(f"sqlite:///{(server.data_dir / 'fluxserve.db').resolve()}")
    try:
        key, admin = server.create_key("user"), server.create_key("ops", admin=True)
        worker = server.health()["worker"]
        assert worker["count"] == 2 and worker["alive"] is True
        assert [one["gpu"] for one in worker["workers"]] == ["0", "1"]
        pids = [one["pid"] for one in worker["workers"]]
        assert len(set(pids)) == 2 and os.getpid() not in pids
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            # each process registered with its GPU, and says what CUDA_VISIBLE_DEVICES it sees
            def registered():
                rows = client.post(DETAILS, json={"key": admin}).json()["workers"]
                return rows if len(rows) == 2 and all(row["state"] for row in rows) else None  # beaten once

            rows = sorted(wait_until(registered, 60, "both workers to register"), key=lambda row: row["gpu"])
            assert [(row["gpu"], row["cuda_visible_devices"], row["pid"]) for row in rows] == [
                ("0", "0", pids[0]), ("1", "1", pids[1])]

            # both generate at once: both processes busy together (by their beats), each did some jobs
            most = [0]
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    with sessions() as session:
                        busy = [row.gpu for row in session.scalars(select(WorkerRow))
                                if (row.status or {}).get("state") == "busy"]
                    most[0] = max(most[0], len(busy))
                    time.sleep(0.05)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            ids = [client.post(KLEIN, json={"key": key, **BODY, "seed": seed}).json()["id"] for seed in range(4)]
            for job_id in ids:
                assert wait_for_job(client, key, job_id, timeout=300).json()["status"] == "success"
            done.set()
            watcher.join(5)
            assert most[0] == 2, f"at most {most[0]} worker(s) were busy at once"
            counts = wait_until(lambda: (c := {row["gpu"]: row["jobs_done"] for row in registered() or []})
                                and sum(c.values()) == len(ids) and c, 30, "the workers to report their jobs")
            assert counts["0"] >= 1 and counts["1"] >= 1, counts

        # kill -9 the GPU 1 worker: only it is restarted
        os.kill(pids[1], signal.SIGKILL)

        def restarted():
            workers = server.health()["worker"]["workers"]
            return workers if workers[1]["restarts"] == 1 and workers[1]["alive"] else None

        after = wait_until(restarted, 60, "the GPU 1 worker to be restarted")
        assert after[1]["pid"] != pids[1] and after[1]["gpu"] == "1"
        assert after[0]["pid"] == pids[0] and after[0]["restarts"] == 0 and after[0]["alive"]
        assert server.health()["worker"]["restarts"] == 1
    finally:
        sessions.kw["bind"].dispose()
        server.stop()
    print(f"two worker processes: at most {most[0]} busy at once; jobs per GPU {counts}")


# -- the pool's logic, with fake hosts ------------------------------------------------------------
class FakeLink:
    def __init__(self) -> None:
        self.running: dict[int, str] = {}
        self.last_status: dict[str, Any] = {}


class FakeHost:
    mode = "process"

    def __init__(self, gpu: str, stop_seconds: float = 0.0) -> None:
        self.gpu, self.stop_seconds = gpu, stop_seconds
        self.link = FakeLink()
        self.calls: list[Any] = []
        self.alive, self.restarts = True, 0

    def start(self) -> None:
        self.calls.append("start")

    def begin_stop(self) -> None:
        self.calls.append("begin_stop")

    def stop(self) -> None:
        self.calls.append("stop")
        time.sleep(self.stop_seconds)

    def force_stop(self) -> None:
        self.calls.append("force_stop")

    def wake(self) -> None:
        self.calls.append("wake")

    def command(self, command: Any) -> None:
        self.calls.append(("command", command))

    def restart(self, settings: Any = None) -> None:
        self.calls.append(("restart", settings))

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "alive": self.alive, "pid": 100 + int(self.gpu), "restarts": self.restarts,
                "gpu": self.gpu, "busy": bool(self.link.running)}


def test_the_pool_passes_every_call_to_every_host():
    hosts = [FakeHost("0"), FakeHost("1")]
    pool = WorkerPool(hosts)  # type: ignore[arg-type]
    pool.start()
    pool.wake()
    pool.command("clear_cache")  # type: ignore[arg-type]
    pool.restart()
    pool.force_stop()
    for host in hosts:
        assert host.calls == ["start", "wake", ("command", "clear_cache"), ("restart", None), "force_stop"]


def test_the_pool_stops_its_hosts_together():
    """Every host stops claiming first, then they drain in parallel: the grace periods overlap."""
    hosts = [FakeHost(str(i), stop_seconds=0.5) for i in range(4)]
    pool = WorkerPool(hosts)  # type: ignore[arg-type]
    started = time.monotonic()
    pool.stop()
    assert time.monotonic() - started < 1.5  # not 4 x 0.5 s
    for host in hosts:
        assert host.calls[0] == "begin_stop" and "stop" in host.calls


def test_the_pool_describes_all_its_workers_and_merges_their_status():
    hosts = [FakeHost("0"), FakeHost("1")]
    pool = WorkerPool(hosts)  # type: ignore[arg-type]
    hosts[1].restarts, hosts[1].link.running = 2, {7: "token"}
    described = pool.describe()
    assert described["pid"] == 100 and described["count"] == 2 and described["restarts"] == 2
    assert described["alive"] is True and described["busy"] == 1 and pool.busy == 1
    assert [one["gpu"] for one in described["workers"]] == ["0", "1"]
    hosts[0].alive = False
    assert pool.describe()["alive"] is False  # one dead worker: the pool is not whole

    assert pool.last_status == {}
    hosts[0].link.last_status = {"models_loaded": ["a"], "device": "cuda:0", "dependencies": {}}
    hosts[1].link.last_status = {"models_loaded": ["a", "b"], "device": "cuda:0",
                                 "dependencies": {"disk": {"reason": "full"}}}
    merged = pool.last_status
    assert merged["models_loaded"] == ["a", "b"] and merged["dependencies"] == {"disk": {"reason": "full"}}
    assert merged["device"] == "cuda:0"
