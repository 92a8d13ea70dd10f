"""kill -9 the worker and the server mid-run with dozens of jobs in flight: after a restart
every id finishes exactly once, with exactly one set of outputs, and fetch answers for all."""

from __future__ import annotations

import http.server
import json
import threading
from collections import Counter

import httpx
import pytest
from sqlalchemy import func, select

from fluxserve.jobs.database import open_database
from fluxserve.jobs.tables import Job, WebhookDelivery
from tests.support.process_server import ServerProcess, _alive
from tests.support.waiting import wait_until

KLEIN = "/api/v1/enterprise/flux_klein/text2img"


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver that counts what it gets (duplicates allowed: at-least-once)."""

    def __init__(self):
        self.received: Counter[int] = Counter()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.received[body["id"]] += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


def statuses(db_url: str) -> Counter:
    sessions = open_database(db_url)
    with sessions() as session:
        return Counter(dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all()))


@pytest.mark.timeout(600)
def test_kill_9_worker_and_server_mid_run_loses_and_duplicates_nothing(tmp_path, tiny_root):
    server = ServerProcess(tmp_path / "data", tiny_root, FLUXSERVE_LEASE_SECONDS="3", FLUXSERVE_HEARTBEAT_SECONDS="0.5",
                           FLUXSERVE_MAX_QUEUED_PER_KEY="1000", FLUXSERVE_SYNC_WAIT_SECONDS="0",
                           FLUXSERVE_MAX_JOB_ATTEMPTS="5")
    db_url = f"sqlite:///{(tmp_path / 'data' / 'fluxserve.db').resolve()}"
    key = server.create_key()
    receiver = Receiver()
    server.start()
    submitted: dict[int, int] = {}  # id -> samples
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            for i in range(36):
                samples = 1 + i % 3
                body = {"key": key, "prompt": f"job {i}", "width": 512, "height": 512, "num_inference_steps": 6,
                        "samples": samples, "seed": i, "webhook": receiver.url, "track_id": f"t{i}",
                        "safety_checker": False}
                answer = client.post(KLEIN, json=body).json()
                assert answer["status"] == "processing", answer
                submitted[answer["id"]] = samples
        # 1) kill -9 the worker while a job runs: the server survives and restarts it
        wait_until(lambda: statuses(db_url)["running"] == 1 and statuses(db_url)["succeeded"] >= 2, 120, "a running job")
        first_worker = server.kill_worker()
        wait_until(lambda: server.health()["worker"]["alive"] and server.worker_pid() != first_worker, 60, "new worker")
        assert server.health()["worker"]["restarts"] == 1
        # 2) kill -9 the whole server with jobs running and queued
        wait_until(lambda: statuses(db_url)["running"] == 1, 120, "a running job after the worker restart")
        before_kill = statuses(db_url)
        assert before_kill["queued"] > 0
        server.kill()
        assert not _alive(first_worker)
        # 3) restart: queued jobs run, the interrupted one is retried after its lease
        server.start()
        wait_until(lambda: statuses(db_url)["succeeded"] == len(submitted), 300, "every job to succeed")
        wait_until(lambda: set(receiver.received) == set(submitted), 60, "every webhook")
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            for job_id, samples in submitted.items():
                answer = client.post(f"/api/v1/enterprise/flux_klein/fetch/{job_id}", json={"key": key}).json()
                assert answer["status"] == "success" and len(answer["output"]) == samples
                assert answer["webhook_status"] == "delivered"
    finally:
        server.stop()
        receiver.shutdown()
    # exactly once: one finishing transaction per job (it writes the only delivery row), one
    # set of files per job, and no file that belongs to no job
    sessions = open_database(db_url)
    with sessions() as session:
        jobs = list(session.scalars(select(Job)))
        deliveries = Counter(session.scalars(select(WebhookDelivery.job_id)))
    assert sorted(job.id for job in jobs) == sorted(submitted)
    assert all(deliveries[job.id] == 1 for job in jobs)
    assert sum(job.attempts for job in jobs) > len(jobs)  # some jobs really were interrupted and retried
    expected_files = {name for job in jobs for name in job.outputs}
    assert len(expected_files) == sum(submitted.values())
    on_disk = {p.name for p in (tmp_path / "data" / "outputs").iterdir() if not p.name.startswith(".tmp-")}
    assert on_disk == expected_files


@pytest.mark.timeout(300)
def test_restart_server_keeps_queued_jobs_and_a_dead_worker_fails_one_job_cleanly(tmp_path, tiny_root):
    server = ServerProcess(tmp_path / "data", tiny_root, FLUXSERVE_SYNC_WAIT_SECONDS="0", FLUXSERVE_MAX_JOB_ATTEMPTS="1",
                           FLUXSERVE_MAX_QUEUED_PER_KEY="100")
    db_url = f"sqlite:///{(tmp_path / 'data' / 'fluxserve.db').resolve()}"
    key, admin = server.create_key(), server.create_key("ops", admin=True)
    server.start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            body = {"key": key, "prompt": "x", "width": 512, "height": 512, "num_inference_steps": 8, "safety_checker": False}
            ids = [client.post(KLEIN, json=body).json()["id"] for _ in range(6)]
            before = server.worker_pid()
            restarted = client.post("/api/v1/enterprise/realtime/restart_server", json={"key": admin}).json()
            assert restarted["status"] == "success"
            wait_until(lambda: statuses(db_url)["succeeded"] == len(ids), 180, "queued jobs to finish after restart")
            assert server.worker_pid() != before
            # with one attempt allowed, a worker killed mid-job fails that job with a message
            victim = client.post(KLEIN, json={**body, "width": 1024, "height": 1024, "num_inference_steps": 40}).json()["id"]
            wait_until(lambda: statuses(db_url)["running"] == 1, 60, "the job to run")
            server.kill_worker()
            wait_until(lambda: statuses(db_url)["failed"] == 1, 60, "the job to fail")
            answer = client.post(f"/api/v1/enterprise/flux_klein/fetch/{victim}", json={"key": key})
            assert answer.status_code == 200 and answer.json()["status"] == "failed"
            assert answer.json()["message"].startswith("Generation was interrupted: the worker stopped during all 1 attempt(s)")
            wait_until(lambda: server.health()["worker"]["alive"], 60, "the worker to come back")
            after = client.post(KLEIN, json={**body, "width": 256, "height": 256}).json()["id"]
            wait_until(lambda: statuses(db_url)["succeeded"] == len(ids) + 1, 60, "a job after the crash")
            assert after > victim
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_a_dead_worker_requeues_every_job_of_its_batch_at_once(tmp_path, tiny_root):
    """Each job of a batch is known to the server as running, so all of them are requeued when
    the worker process dies, not only one (the others would wait out their lease: 10 min here)."""
    server = ServerProcess(tmp_path / "data", tiny_root, FLUXSERVE_SYNC_WAIT_SECONDS="0", FLUXSERVE_MAX_BATCH_SIZE="4",
                           FLUXSERVE_BATCH_WAIT_SECONDS="1.0", FLUXSERVE_LEASE_SECONDS="600")
    db_url = f"sqlite:///{(tmp_path / 'data' / 'fluxserve.db').resolve()}"
    key = server.create_key()
    server.start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            body = {"key": key, "width": 768, "height": 768, "num_inference_steps": 30, "safety_checker": False}
            ids = [client.post(KLEIN, json={**body, "prompt": f"p{i}", "seed": i}).json()["id"] for i in range(3)]
            wait_until(lambda: statuses(db_url)["running"] == 3, 60, "the three jobs to run as one batch")
            server.kill_worker()
            wait_until(lambda: statuses(db_url)["succeeded"] == 3, 240, "every job of the batch to finish")
            for job_id in ids:
                answer = client.post(f"/api/v1/enterprise/flux_klein/fetch/{job_id}", json={"key": key}).json()
                assert answer["status"] == "success"
            with open_database(db_url)() as session:  # each one ran twice: killed in the batch, then again
                assert sorted(session.scalars(select(Job.attempts).where(Job.id.in_(ids)))) == [2, 2, 2]
    finally:
        server.stop()
