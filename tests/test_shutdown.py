"""Graceful shutdown of a real ``fluxserve serve``: SIGTERM stops claiming at once, lets the job
in hand finish within FLUXSERVE_SHUTDOWN_GRACE_SECONDS (else puts it back in the queue, its
attempt not counted), ends progress streams with a final event, and exits 0; a second SIGTERM
exits at once. The measured times are printed (pytest -s shows them)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
from sqlalchemy import select

from fluxserve.events import JobEvents
from fluxserve.jobs.database import open_database
from fluxserve.jobs.tables import Job, WebhookDelivery, utcnow
from fluxserve.supervisor import STOP_SLACK_SECONDS
from tests.support.process_server import ServerProcess, _alive
from tests.support.waiting import wait_for_job, wait_until

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
FETCH = "/api/v1/enterprise/flux_klein/fetch/{id}"
SHORT = {"width": 256, "height": 256, "num_inference_steps": 2}
# the longest job a request may ask for: 4 images of 1024², 50 steps; ~12 s on 2 idle CPU cores
# (a minute and more on a busy machine), so a signal always lands while it is being generated
LONG = {"width": 1024, "height": 1024, "num_inference_steps": 50, "samples": 4}


class Database:
    """The server's job rows, read directly (one engine: opening the database creates tables)."""

    def __init__(self, server: ServerProcess):
        self.sessions = open_database(f"sqlite:///{(server.data_dir / 'fluxserve.db').resolve()}")

    def jobs(self) -> dict[int, Job]:
        with self.sessions() as session:
            return {job.id: job for job in session.scalars(select(Job))}

    def job(self, job_id: int) -> Job:
        with self.sessions() as session:
            job = session.get(Job, job_id)
        assert job is not None
        return job

    def deliveries(self, job_id: int) -> int:
        with self.sessions() as session:
            return len(list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))))

    def generating(self, job_id: int) -> bool:
        """The job is past its first denoising step (its model is loaded: it really generates)."""
        job = self.job(job_id)
        return job.status == "running" and job.progress_step >= 1

    def close(self) -> None:
        self.sessions.kw["bind"].dispose()


def submit(client: httpx.Client, key: str, **body) -> int:
    answer = client.post(KLEIN, json={"key": key, "prompt": "a lighthouse", "safety_checker": False,
                                      "instant_response": True, **body}).json()
    assert answer["status"] == "processing", answer
    return answer["id"]


class EventStream:
    """An open SSE progress stream, read on a thread: its events in order, and whether the
    server closed it."""

    def __init__(self, server: ServerProcess, key: str, job_id: int):
        self.events: list[tuple[str, dict]] = []
        self.closed = threading.Event()
        self.error: BaseException | None = None
        url = f"{server.base_url}/api/fluxserve/jobs/{job_id}/events"
        threading.Thread(target=self._read, args=(url, key), daemon=True).start()

    def _read(self, url: str, key: str) -> None:
        try:
            with httpx.stream("GET", url, headers={"Key": key}, timeout=httpx.Timeout(5, read=120)) as response:
                name = None
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        name = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and name:
                        self.events.append((name, json.loads(line.split(":", 1)[1])))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc
        finally:
            self.closed.set()

    def last(self) -> tuple[str, dict]:
        return self.events[-1]


def test_job_events_shutdown_wakes_every_waiter_and_later_waits_return_at_once():
    events = JobEvents()

    async def scenario() -> float:
        waiters = [asyncio.create_task(events.wait(job_id, 30)) for job_id in (1, 1, 2)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        threading.Thread(target=events.shutdown).start()  # as the server's stop thread does
        await asyncio.wait_for(asyncio.gather(*waiters), 5)
        await asyncio.wait_for(events.wait(3, 30), 1)  # closing: no waiting at all
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.0
    assert events.closing.is_set()


POLL = 0.2  # the test's own polling competes with the server for 2 CPU cores: not too often


@pytest.mark.timeout(900)  # ~15 s on 2 idle cores; minutes on an overloaded machine
@pytest.mark.parametrize("worker", ["process", "thread"])
def test_sigterm_finishes_the_running_job_claims_nothing_more_closes_streams_and_exits_0(tmp_path, tiny_root, worker):
    server = ServerProcess(tmp_path / "data", tiny_root, FLUXSERVE_WORKER=worker, FLUXSERVE_SHUTDOWN_GRACE_SECONDS="600",
                           FLUXSERVE_MAX_QUEUED_PER_KEY="100")
    key = server.create_key()
    server.start()
    db = Database(server)
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            # the long job, with a webhook (nothing listens: the row is what counts)
            long = submit(client, key, **LONG, webhook="http://127.0.0.1:9/hook")
            queued = [submit(client, key, seed=i, **SHORT) for i in range(3)]
            wait_until(lambda: db.generating(long), 120, "the long job to generate", POLL)
            streams = {job_id: EventStream(server, key, job_id) for job_id in (long, queued[0])}
            wait_until(lambda: all(stream.events for stream in streams.values()), 30, "both streams to open", POLL)
            waiting: list[httpx.Response] = []  # a request waiting for its job (sync wait: 30 s)
            waiter = threading.Thread(target=lambda: waiting.append(httpx.post(
                server.base_url + KLEIN, json={"key": key, "prompt": "sync", "safety_checker": False, **SHORT},
                timeout=60)), daemon=True)
            waiter.start()
            wait_until(lambda: len(db.jobs()) == 5, 30, "the waiting request's job", POLL)
            assert db.job(long).status == "running"
            signalled = utcnow()
            status, seconds = server.terminate(timeout=700)
        rows, deliveries = db.jobs(), db.deliveries(long)
    finally:
        server.stop()
        db.close()
    finished = (rows[long].finished_at.replace(tzinfo=None) - signalled.replace(tzinfo=None)).total_seconds()
    print(f"\n[{worker} worker] SIGTERM during a job: exit status {status} after {seconds:.2f} s; "
          f"the job finished {finished:.2f} s after the signal")
    assert status == 0, server.log()
    assert rows[long].status == "succeeded" and rows[long].attempts == 1
    assert 0 < finished < seconds
    assert deliveries == 1  # its webhook is queued (sent after the restart if not before)
    for job_id in [*queued, max(rows)]:  # none of the queued ones was claimed after the signal
        assert rows[job_id].status == "queued" and rows[job_id].started_at is None and rows[job_id].attempts == 0
    assert seconds < finished + 10  # it exits promptly once the job is done
    # each open progress stream ended with the final event, then the server closed it
    for job_id, stream in streams.items():
        assert stream.closed.wait(5) and stream.error is None, stream.error
        name, body = stream.last()
        assert name == "shutdown", stream.events
        assert body["id"] == job_id and body["status"] == "processing"
        assert body["job_status"] in ("queued", "running")
        assert body["fetch_result"] == server.base_url + FETCH.format(id=job_id)
        assert "restarting" in body["message"]
    # the request that was waiting for its job answered processing (with where to fetch it)
    waiter.join(5)
    assert waiting and waiting[0].status_code == 200 and waiting[0].json()["status"] == "processing"
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log


@pytest.mark.timeout(300)
def test_a_job_longer_than_the_grace_period_goes_back_to_the_queue_and_a_restart_finishes_it(tmp_path, tiny_root):
    grace = 2.0
    server = ServerProcess(tmp_path / "data", tiny_root, FLUXSERVE_SHUTDOWN_GRACE_SECONDS=str(grace))
    key = server.create_key()
    server.start()
    db = Database(server)
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            long = submit(client, key, **LONG)
            wait_until(lambda: db.generating(long), 120, "the long job to generate", POLL)
            status, seconds = server.terminate(timeout=60)
        print(f"\n[process worker] SIGTERM with a {grace:.0f} s grace period during a longer job: "
              f"exit status {status} after {seconds:.2f} s")
        assert status == 0, server.log()
        # the grace period, then the next step boundary (~0.6 s here; more on a busy machine);
        # never later than the server's bound, when it kills a worker that did not stop
        assert seconds < grace + STOP_SLACK_SECONDS
        assert "killing it" not in server.log()
        job = db.job(long)
        assert job.status == "queued" and job.attempts == 0 and job.claim_token is None, job  # not failed, not counted
        assert job.waits == 0 and job.error is None and job.finished_at is None
        server.start()  # a restarted server takes it at once (no lease to wait out)
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            answer = wait_for_job(client, key, long, 180, FETCH)
        assert answer.json()["status"] == "success", answer.json()
        assert db.job(long).attempts == 1
    finally:
        server.stop()
        db.close()
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("worker", ["process", "thread"])
def test_a_second_sigterm_exits_at_once_and_puts_the_running_job_back(tmp_path, tiny_root, worker):
    server = ServerProcess(tmp_path / "data", tiny_root, FLUXSERVE_WORKER=worker, FLUXSERVE_SHUTDOWN_GRACE_SECONDS="300")
    key = server.create_key()
    server.start()
    db = Database(server)
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            long = submit(client, key, **LONG)
            wait_until(lambda: db.generating(long), 120, "the long job to generate", POLL)
            worker_pid = server.worker_pid()
            server.signal(signal.SIGTERM)
            time.sleep(1.0)  # the first one is under way: the job may take 300 s
            assert server.process.poll() is None
            sent = server.signal(signal.SIGTERM)
            status = server.wait(timeout=30)
            seconds = time.monotonic() - sent
        job = db.job(long)
    finally:
        server.stop()
        db.close()
    print(f"\n[{worker} worker] second SIGTERM: exit status {status} after {seconds:.2f} s")
    assert status == 128 + signal.SIGTERM, server.log()
    assert seconds < 5
    assert job.status == "queued" and job.attempts == 0 and job.claim_token is None, job
    if worker == "process":
        wait_until(lambda: not _alive(worker_pid), 10, "the worker process to be gone")
    # os._exit skips multiprocessing's finalizers: the resource tracker (which warns once the last
    # process holding it is gone) used to report "12 leaked semaphore objects" here
    time.sleep(1.5)
    assert "leaked semaphore" not in server.log() and "resource_tracker" not in server.log(), server.log()
