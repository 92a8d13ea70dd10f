"""Wake-ups across processes on PostgreSQL (``jobs.notify``): the store NOTIFYs each job change
on commit (and not on a rollback), an API replica's listener wakes its waiting requests and
progress streams when a worker elsewhere changes a job, and after a database outage it
reconnects while waiters fall back to polling."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid

import httpx
import pytest

from fluxserve.events import PUSHED_POLL_SECONDS, JobEvents
from fluxserve.jobs.database import open_database
from fluxserve.jobs.notify import JobNotifications, libpq_url, listens
from fluxserve.jobs.store import NOTIFY_CHANNEL, JobStore
from fluxserve.keys import KeyStore
from tests.support.postgres import PostgresUnavailable, create_database, postgres_cluster, postgres_required
from tests.support.replicas import api_replica, worker_node
from tests.support.waiting import wait_until

KLEIN = "/api/v1/enterprise/flux_klein/text2img"


@pytest.fixture
def database(postgres_server):
    return create_database(postgres_server, f"notify_{uuid.uuid4().hex[:10]}")


def job_args(key_id: int, **extra) -> dict:
    return dict(key_id=key_id, server="v6", model="flux-klein-4b", task="text2img", file_prefix=uuid.uuid4().hex,
                params={"steps": 1, "seeds": [1]}, meta={}, **extra)


class Heard:
    """A plain LISTEN connection collecting the channel's payloads."""

    def __init__(self, url: str):
        import psycopg

        self.connection = psycopg.connect(libpq_url(url), autocommit=True)
        self.connection.execute(f"LISTEN {NOTIFY_CHANNEL}")

    def payloads(self, wait: float = 0.5) -> list[str]:
        return [n.payload for n in self.connection.notifies(timeout=wait)]


def test_every_job_transition_is_announced_on_commit(database):
    sessions = open_database(database)
    store = JobStore(sessions)
    key_id = KeyStore(sessions).create("user")[0].id
    heard = Heard(database)
    try:
        job = store.create(**job_args(key_id))
        assert heard.payloads() == [f"{job.id} queued"]
        claimed = store.claim_next()
        assert claimed is not None and claimed.id == job.id
        assert store.heartbeat(job.id, claimed.claim_token, 1, 4)
        assert store.heartbeat(job.id, claimed.claim_token)  # a bare beat: nothing shown changed
        assert heard.payloads() == [str(job.id), str(job.id)]  # the claim, the progress
        assert store.release(job.id, claimed.claim_token, 0.0)
        assert heard.payloads() == [f"{job.id} queued"]
        again = store.claim_next()
        assert again is not None
        assert store.succeed(job.id, again.claim_token, outputs=[], nsfw_detected=False, generation_time=0.1, meta={})
        assert heard.payloads() == [str(job.id), str(job.id)]
        assert not store.succeed(job.id, again.claim_token, outputs=[], nsfw_detected=False, generation_time=0.1,
                                 meta={})  # not running any more: no change, no announcement
        cancelled = store.create(**job_args(key_id))
        heard.payloads()
        assert store.cancel(cancelled.id)
        assert heard.payloads() == [str(cancelled.id)]
        stale = store.create(**job_args(key_id))
        running = store.claim_next()
        assert running is not None and running.id == stale.id
        heard.payloads()
        assert store.recover(stale.id, running.claim_token, max_attempts=3) == "requeued"
        assert heard.payloads() == [f"{stale.id} queued"]
        # a transaction that rolls back announces nothing: a job with a webhook needs its payload
        again = store.claim_next()
        assert again is not None
        heard.payloads()
        with sessions.begin() as session:
            from sqlalchemy import update

            from fluxserve.jobs.tables import Job

            session.execute(update(Job).where(Job.id == again.id).values(webhook="http://127.0.0.1:9/hook"))
        with pytest.raises(ValueError):
            store.succeed(again.id, again.claim_token, outputs=[], nsfw_detected=False, generation_time=0.1, meta={})
        assert heard.payloads() == []
    finally:
        heard.connection.close()


def test_sqlite_announces_nothing_and_gets_no_listener(tmp_path):
    assert not listens(f"sqlite:///{tmp_path / 'x.db'}")
    assert listens("postgresql+psycopg://u@127.0.0.1:5432/db") and listens("postgresql://u@h/db")
    sessions = open_database(f"sqlite:///{tmp_path / 'x.db'}")
    key_id = KeyStore(sessions).create("user")[0].id
    job = JobStore(sessions).create(**job_args(key_id))  # the store works as before (no pg_notify on SQLite)
    assert JobStore(sessions).claim_next().id == job.id


def test_the_listener_hands_changes_to_the_events(database):
    sessions = open_database(database)
    store = JobStore(sessions)
    key_id = KeyStore(sessions).create("user")[0].id
    changed, queued = [], []
    listener = JobNotifications(database, on_change=changed.append, on_queued=lambda: queued.append(1))
    listener.start()
    try:
        assert listener.wait_connected(20)
        job = store.create(**job_args(key_id))
        claimed = store.claim_next()
        assert claimed is not None
        store.fail(job.id, claimed.claim_token, "no")
        wait_until(lambda: changed == [job.id] * 3, 10, "three changes")
        assert queued == [1]
    finally:
        listener.stop()
    assert not listener.connected


def test_after_a_database_outage_the_listener_reconnects_and_waiters_poll_meanwhile(tmp_path):
    try:
        cluster_context = postgres_cluster(tmp_path, durable=True)
        cluster = cluster_context.__enter__()
    except PostgresUnavailable as exc:
        if postgres_required():
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        sessions = open_database(cluster.url)
        store = JobStore(sessions)
        key_id = KeyStore(sessions).create("user")[0].id
        events = JobEvents()
        pushed_changes: list[bool] = []

        def on_connected(connected: bool) -> None:
            pushed_changes.append(connected)
            events.set_pushed(connected)

        listener = JobNotifications(cluster.url, on_change=events.job_changed, on_connected=on_connected)
        listener.start()
        assert listener.wait_connected(20)
        assert events.poll_seconds(1.0) == PUSHED_POLL_SECONDS  # pushed: waiters poll rarely
        cluster.stop()
        wait_until(lambda: not listener.connected, 20, "the listener to notice the outage")
        assert events.poll_seconds(1.0) == 1.0  # back to tight polling while nothing is pushed
        cluster.start()
        assert listener.wait_connected(30)
        assert pushed_changes[:3] == [True, False, True]
        job = store.create(**job_args(key_id))
        woken = threading.Event()

        def waiter() -> None:
            import asyncio

            async def wait() -> None:
                await events.wait(job.id, 20)
            asyncio.run(wait())
            woken.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)  # the waiter is registered
        started = time.monotonic()
        claimed = store.claim_next()
        assert claimed is not None
        assert woken.wait(5), "the waiter was not woken by the NOTIFY after the reconnect"
        assert time.monotonic() - started < 5
        thread.join(5)
        listener.stop()
    finally:
        cluster_context.__exit__(None, None, None)


def test_a_waiting_request_on_one_replica_wakes_when_a_worker_elsewhere_finishes(tmp_path, tiny_root, database):
    """Replica B answers the request synchronously; the worker runs on another "node". Pushed,
    B re-reads the store only every PUSHED_POLL_SECONDS: answering well within that means the
    NOTIFY woke it."""
    settings = dict(database_url=database, sync_wait_seconds=60)
    with api_replica(tmp_path / "b", tiny_root, **settings) as b, worker_node(tmp_path / "w", tiny_root, **settings):
        key = KeyStore(b.jobs._sessions).create("user")[1]
        assert b.events.pushed
        body = {"key": key, "prompt": "a", "width": 256, "height": 256, "num_inference_steps": 1,
                "safety_checker": False}
        with b.client() as client:
            client.post(KLEIN, json=body)  # loads the model on the worker
            for _ in range(3):
                answer = client.post(KLEIN, json=body)
                arrived = time.time()
                assert answer.json()["status"] == "success"
                finished = b.jobs.get(answer.json()["id"]).finished_at
                lag = arrived - finished.timestamp()
                assert lag < PUSHED_POLL_SECONDS / 2, f"woken {lag:.2f}s after the job finished"


def test_a_progress_stream_on_one_replica_follows_a_worker_elsewhere(tmp_path, tiny_root, database):
    settings = dict(database_url=database, sync_wait_seconds=0)
    with api_replica(tmp_path / "b", tiny_root, **settings) as b:
        key = KeyStore(b.jobs._sessions).create("user")[1]
        with b.client() as client:
            job = client.post(KLEIN, json={"key": key, "prompt": "a", "width": 256, "height": 256,
                                           "num_inference_steps": 4, "safety_checker": False}).json()
            events: list[tuple[str, dict]] = []
            with contextlib.ExitStack() as worker, \
                    httpx.stream("GET", f"{b.base_url}/api/fluxserve/jobs/{job['id']}/events",
                                 headers={"key": key}, timeout=60) as stream:
                name = None
                for line in stream.iter_lines():
                    if line.startswith("event:"):
                        name = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and name:
                        events.append((name, json.loads(line.split(":", 1)[1])))
                        if len(events) == 1:  # queued, seen: now a worker on another node takes it
                            worker.enter_context(worker_node(tmp_path / "w", tiny_root, **settings))
                        if name == "done":
                            done_at = time.time()
                            break
        names = [name for name, _ in events]
        assert names[0] == "queued" and names[-1] == "done" and "progress" in names
        assert events[-1][1]["status"] == "success"
        lag = done_at - b.jobs.get(job["id"]).finished_at.timestamp()
        assert lag < PUSHED_POLL_SECONDS / 2, f"the stream said done {lag:.2f}s after the job finished"
