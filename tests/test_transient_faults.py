"""Short outages wait instead of failing: the object store (moto, stopped and restarted), a full
disk (simulated: every write raises ENOSPC), PostgreSQL (a real server, stopped and restarted).
Each test asserts: no job lost, none failed for a transient cause, the answers clients saw (503
with a retry hint while the dependency is away, never 500), /health saying degraded and why,
and a quiet log (one line when the dependency goes, one when it is back)."""

from __future__ import annotations

import errno
import logging
import time

import pytest
from sqlalchemy import func, select

from fluxserve.jobs.tables import Job
from fluxserve.storage.local import LocalStorage
from tests.support.postgres import PostgresUnavailable, postgres_cluster, postgres_required
from tests.support.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, create_bucket
from tests.support.servers import free_port, live_server
from tests.support.waiting import wait_until

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
BODY = {"prompt": "a cat", "width": 256, "height": 256, "num_inference_steps": 1, "instant_response": True}


def statuses(live) -> dict[str, int]:
    with live.jobs._sessions() as session:
        rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {status: count for status, count in rows}


def outage_lines(caplog, dependency: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{dependency} ")]


# -- the object store --------------------------------------------------------------------------------
def test_an_object_store_outage_keeps_every_job(tmp_path, tiny_root, caplog):
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    create_bucket(endpoint, "outputs")
    default = {"public_url": "https://cdn.example.test/out", "endpoint_url": endpoint, "region_name": "us-east-1",
               "aws_access_key_id": DUMMY_ACCESS_KEY, "aws_secret_access_key": DUMMY_SECRET_KEY,
               "image_directory": "outputs/gen"}
    caplog.set_level(logging.INFO)
    try:
        with live_server(tmp_path, tiny_root, s3_default=default, s3_upload_attempts=1) as live, \
                live.client() as client:
            body = {**BODY, "key": live.key}
            first = client.post(KLEIN, json=body).json()
            wait_until(lambda: statuses(live).get("succeeded") == 1, 60, "a job before the outage")
            moto.stop()  # the object store goes away
            ids = [client.post(KLEIN, json=body).json()["id"] for _ in range(6)]
            health = wait_until(lambda: (h := client.get("/health")).status_code == 503 and h.json(), 60,
                                "health to say degraded")
            assert "object_store" in health["dependencies"] and health["status"] == "degraded"
            refused = client.post(KLEIN, json=body)  # a job for the bucket could only wait
            assert refused.status_code == 503 and refused.json()["message"] == "Service temporarily unavailable"
            assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["retry_after"] >= 1
            time.sleep(2)  # the outage lasts: the worker must not drain the queue into failures
            assert statuses(live).get("failed", 0) == 0
            moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            moto.start()  # back (moto keeps its buckets in this process)
            wait_until(lambda: statuses(live).get("succeeded") == 1 + len(ids), 120, "every job after the outage")
            assert statuses(live) == {"succeeded": 1 + len(ids)}
            wait_until(lambda: client.get("/health").status_code == 200, 30, "health to recover")
            assert first["id"] < min(ids)
    finally:
        moto.stop()
    assert len(outage_lines(caplog, "object_store")) <= 2 * 2  # gone + back (worker, and maybe the API's view)
    assert not [r for r in caplog.records if r.exc_info and "object" in r.getMessage().lower()]


# -- the disk ----------------------------------------------------------------------------------------
class FullDisk:
    """While on, every file write of the outputs/inputs storage fails with ENOSPC."""

    def __init__(self, monkeypatch):
        self.on = False
        save, check = LocalStorage.save, LocalStorage.check

        def full_save(storage, name, data, content_type="image/png"):
            if self.on:
                raise OSError(errno.ENOSPC, "No space left on device")
            return save(storage, name, data, content_type)

        def full_check(storage):
            if self.on:
                raise OSError(errno.ENOSPC, "No space left on device")
            return check(storage)

        monkeypatch.setattr(LocalStorage, "save", full_save)
        monkeypatch.setattr(LocalStorage, "check", full_check)


def test_a_full_disk_keeps_every_job_and_refuses_new_ones_honestly(tmp_path, tiny_root, monkeypatch, caplog,
                                                                  image_host):
    disk = FullDisk(monkeypatch)
    caplog.set_level(logging.INFO)
    with live_server(tmp_path, tiny_root) as live, live.client() as client:
        body = {**BODY, "key": live.key}
        disk.on = True
        ids = [client.post(KLEIN, json=body).json()["id"] for _ in range(4)]  # accepted: nobody knows yet
        health = wait_until(lambda: (h := client.get("/health")).status_code == 503 and h.json(), 60,
                            "health to say degraded")
        assert "disk" in health["dependencies"] and "No space left" in health["dependencies"]["disk"]["reason"]
        refused = client.post(KLEIN, json=body)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        with_image = client.post("/api/v1/enterprise/realtime/img2img",
                                 json={**body, "init_image": f"{image_host}/b.jpg"})
        assert with_image.status_code == 503  # refused before storing its init image
        details = client.post("/api/v1/enterprise/flux_klein/system_details", json={"key": live.admin_key}).json()
        assert details["status"] == "degraded" and "disk" in details["dependencies"]
        time.sleep(1.5)
        assert statuses(live).get("failed", 0) == 0 and statuses(live).get("queued", 0) >= 3
        disk.on = False  # space is back
        wait_until(lambda: statuses(live).get("succeeded") == len(ids), 120, "every job after the disk frees up")
        assert statuses(live) == {"succeeded": len(ids)}
        wait_until(lambda: client.get("/health").status_code == 200, 30, "health to recover")
        assert client.post(KLEIN, json=body).status_code == 200
    lines = outage_lines(caplog, "disk")
    assert 2 <= len(lines) <= 4, lines  # unavailable + back (worker), plus the API's own view at most


# -- the database --------------------------------------------------------------------------------------
@pytest.fixture
def cluster(tmp_path):
    try:
        with postgres_cluster(tmp_path, durable=True) as running:  # committed jobs must survive its crash
            yield running
    except PostgresUnavailable as exc:
        if postgres_required():
            pytest.fail(f"FLUXSERVE_REQUIRE_POSTGRES=1 but {exc}")
        pytest.skip(str(exc))


def test_a_database_outage_answers_503_and_loses_nothing(tmp_path, tiny_root, cluster, caplog):
    caplog.set_level(logging.INFO)
    with live_server(tmp_path, tiny_root, database_url=cluster.url) as live, live.client() as client:
        body = {**BODY, "key": live.key}
        before = [client.post(KLEIN, json=body).json()["id"] for _ in range(3)]
        cluster.stop()
        answers = [client.post(KLEIN, json=body) for _ in range(3)]
        for answer in answers:  # never a 500 (nor a 401: the key lookup itself needs the database)
            assert answer.status_code == 503, answer.text
            assert answer.headers.get("Retry-After") and answer.json()["message"] == "Service temporarily unavailable"
        health = client.get("/health")
        assert health.status_code == 503 and "database" in health.json()["dependencies"]
        time.sleep(2)
        cluster.start()
        try:
            wait_until(lambda: statuses(live).get("succeeded", 0) == len(before), 120, "the jobs from before the outage")
        except AssertionError:
            raise AssertionError(f"jobs now: {statuses(live)}; health: {client.get('/health').json()}") from None
        assert statuses(live) == {"succeeded": len(before)}
        assert client.post(KLEIN, json=body).status_code == 200
        wait_until(lambda: client.get("/health").status_code == 200, 30, "health to recover")
    tracebacks = [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]
    assert len(tracebacks) <= 3, [r.getMessage() for r in tracebacks]  # not one per poll


def test_an_answer_after_the_commit_never_fails(server, monkeypatch):
    """The job is in the store: if working out its eta fails (the database went away between the
    insert and the answer), the client still gets the id, or it would send the request again."""
    from sqlalchemy.exc import OperationalError

    from fluxserve.jobs.store import JobStore

    def away(*_args, **_kwargs):
        raise OperationalError("select", {}, ConnectionRefusedError("gone"))

    monkeypatch.setattr(JobStore, "jobs_ahead", away)
    with server.client() as client:
        answer = client.post(KLEIN, json={**BODY, "key": server.key})
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "processing" and isinstance(body["id"], int) and body["eta"] > 0
    assert body["fetch_result"].endswith(f"/fetch/{body['id']}") and len(body["future_links"]) == 1
