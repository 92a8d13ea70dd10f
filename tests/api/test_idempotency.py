"""Idempotent submissions (Stripe's rules): an ``Idempotency-Key`` header (or, opt-in, the
``track_id``) makes a request safe to send again: the same key and request answer the first job;
the same key with another request is refused; keys are kept 24 hours."""

from __future__ import annotations

import threading
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select, update

from fluxserve.jobs.tables import IdempotencyKey, Job, utcnow
from tests.support.process_server import ServerProcess
from tests.support.servers import live_server
from tests.support.waiting import wait_until

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
BODY = {"prompt": "a red fox", "width": 256, "height": 256, "num_inference_steps": 1}


def jobs_with_prompt(server, prompt: str) -> int:
    with server.jobs._sessions() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.meta["prompt"].as_string() == prompt))


def test_the_same_key_and_request_answer_the_first_job(server, client):
    body = {**BODY, "key": server.key, "prompt": "idempotent fox", "width": "256"}
    first = client.post(KLEIN, json=body, headers={"Idempotency-Key": "order-1"})
    again = client.post(KLEIN, json={**body, "width": 256}, headers={"Idempotency-Key": "order-1"})  # same, as parsed
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"] and again.json()["status"] == "success"
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert again.json()["output"] == first.json()["output"]
    assert jobs_with_prompt(server, "idempotent fox") == 1
    other_key = client.post(KLEIN, json={**body, "key": server.other_key}, headers={"Idempotency-Key": "order-1"})
    assert other_key.json()["id"] != first.json()["id"]  # keys are per API key


def test_the_same_key_with_another_request_is_refused(server, client):
    body = {**BODY, "key": server.key, "prompt": "first request"}
    first = client.post(KLEIN, json=body, headers={"Idempotency-Key": "order-2"}).json()
    before = server.job_count()
    refused = client.post(KLEIN, json={**body, "prompt": "another request"}, headers={"Idempotency-Key": "order-2"})
    assert refused.status_code == 409 and refused.json()["status"] == "error"
    assert refused.json()["message"].startswith("Idempotency-Key was already used with a different request")
    assert refused.json()["id"] == first["id"] and server.job_count() == before
    elsewhere = client.post("/api/v6/realtime/text2img", json=body, headers={"Idempotency-Key": "order-2"})
    assert elsewhere.status_code == 409  # another path is another request


def test_concurrent_twins_make_one_job(server):
    answers: list[httpx.Response] = []
    body = {**BODY, "key": server.key, "prompt": "concurrent twins", "instant_response": True}

    def send():
        answers.append(httpx.post(server.base_url + KLEIN, json=body, headers={"Idempotency-Key": "twins"}, timeout=60))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["id"] for a in answers}) == 1
    assert jobs_with_prompt(server, "concurrent twins") == 1


def test_keys_are_kept_24_hours(server, client):
    body = {**BODY, "key": server.key, "prompt": "a day later", "instant_response": True}
    first = client.post(KLEIN, json=body, headers={"Idempotency-Key": "daily"}).json()["id"]
    with server.jobs._sessions.begin() as session:
        session.execute(update(IdempotencyKey).where(IdempotencyKey.value == "daily")
                        .values(created_at=utcnow() - timedelta(hours=25)))
    second = client.post(KLEIN, json=body, headers={"Idempotency-Key": "daily"}).json()["id"]
    assert second != first
    assert server.jobs.forget_idempotency_keys(utcnow() + timedelta(hours=25)) >= 1  # the janitor's sweep


@pytest.mark.parametrize("bad", ["x" * 256, "tab\there", "é-accent"])
def test_malformed_keys_are_refused(server, client, bad):
    response = client.post(KLEIN, json={**BODY, "key": server.key}, headers={"Idempotency-Key": bad.encode("utf-8")})
    assert response.status_code == 400
    assert response.json()["message"] == "Idempotency-Key must be 1-255 printable ASCII characters"


def test_track_id_dedupes_only_when_the_server_is_told_to(tmp_path, tiny_root):
    body = {**BODY, "prompt": "tracked", "track_id": "client-42", "instant_response": True}
    with live_server(tmp_path / "on", tiny_root, idempotent_track_id=True) as live, live.client() as client:
        ids = {client.post(KLEIN, json={**body, "key": live.key}).json()["id"] for _ in range(3)}
        assert len(ids) == 1
    with live_server(tmp_path / "off", tiny_root) as live, live.client() as client:
        ids = {client.post(KLEIN, json={**body, "key": live.key}).json()["id"] for _ in range(3)}
        assert len(ids) == 3


def test_a_client_retrying_after_the_server_was_killed_gets_one_job(tmp_path, tiny_root):
    """The server is killed -9 while the client waits for its answer; the client sends the
    request again (with its key) to the restarted server: one job, run once."""
    server = ServerProcess(tmp_path / "data", tiny_root, FLUXSERVE_SYNC_WAIT_SECONDS="60")
    key = server.create_key()
    body = {"key": key, "prompt": "survives a crash", "width": 1024, "height": 1024, "num_inference_steps": 25}
    server.start()
    try:
        waiting: list[BaseException] = []

        def first_try():
            try:
                httpx.post(server.base_url + KLEIN, json=body, headers={"Idempotency-Key": "crash-1"}, timeout=120)
            except httpx.HTTPError as exc:  # the server dies under it
                waiting.append(exc)

        thread = threading.Thread(target=first_try)
        thread.start()
        wait_until(lambda: server.health()["queue_depth"] == 0 and _running(server), 60, "the job to run")
        server.kill()
        thread.join(30)
        assert waiting, "the first answer should have been cut off by the kill"
        server.start()
        again = httpx.post(server.base_url + KLEIN, json=body, headers={"Idempotency-Key": "crash-1"}, timeout=300)
        assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true"
        done = again.json()
        if done["status"] == "processing":
            done = wait_until(lambda: (a := httpx.post(f"{server.base_url}/api/v6/images/fetch/{done['id']}",
                                                       json={"key": key}, timeout=30).json())["status"] != "processing"
                              and a, 300, "the job")
        assert done["status"] == "success"
        from fluxserve.jobs.database import open_database

        sessions = open_database(f"sqlite:///{(tmp_path / 'data' / 'fluxserve.db').resolve()}")
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(Job)) == 1  # one job, not two
    finally:
        server.stop()


def _running(server: ServerProcess) -> bool:
    from fluxserve.jobs.database import open_database

    sessions = open_database(f"sqlite:///{(server.data_dir / 'fluxserve.db').resolve()}")
    with sessions() as session:
        return bool(session.scalar(select(func.count()).select_from(Job).where(Job.status == "running")))
