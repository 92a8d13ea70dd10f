"""A local cluster, for real: one PostgreSQL, one S3 server (moto), two API processes
(``fluxserve serve --no-worker``, each with a data folder of its own) and two worker processes
(``fluxserve worker``, each with its own folder too: nothing is shared but the database and the
bucket), tiny models. 64 jobs spread over both APIs, each with a webhook; mid-run one worker and
one API are killed -9 and started again. Every job succeeds exactly once (one job per logical
request, one finish per job), every webhook arrives, and either API answers any job, its images
included. The measured times are printed (pytest -s shows them)."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from contextlib import ExitStack

import httpx
import pytest
from sqlalchemy import select

from fluxserve.jobs.database import open_database
from fluxserve.jobs.tables import Job, WebhookDelivery
from tests.support.process_server import ServerProcess, WorkerProcess
from tests.support.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, create_bucket, running_s3, s3_client
from tests.support.waiting import wait_until
from tests.test_crash_safety import Receiver  # counts each job's webhooks

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
FETCH = "/api/v1/enterprise/flux_klein/fetch/{id}"
JOBS = 64
BODY = {"width": 256, "height": 256, "num_inference_steps": 2, "safety_checker": False, "instant_response": True}


def submit(api: ServerProcess, key: str, serial: int, webhook: str) -> tuple[str, int]:
    """One logical request (its track_id), sent until an answer carries its id: a connection
    error (the API being killed) is sent again with the same Idempotency-Key."""
    track_id = f"cluster-{serial}"
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"key": key, "prompt": f"a lighthouse, number {serial}", "seed": serial, "track_id": track_id,
            "webhook": webhook, **BODY}
    deadline = time.monotonic() + 120
    while True:
        try:
            answer = httpx.post(api.base_url + KLEIN, json=body, headers=headers, timeout=30)
            if answer.status_code == 200:
                assert answer.json()["status"] in ("processing", "success"), answer.text
                return track_id, answer.json()["id"]
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"request {serial} was never accepted"
        time.sleep(0.5)


@pytest.mark.timeout(900)
def test_two_apis_and_two_workers_lose_nothing_when_one_of_each_is_killed(tmp_path, tiny_root, database_url):
    began = time.monotonic()
    with ExitStack() as stack:
        endpoint = stack.enter_context(running_s3())
        bucket = create_bucket(endpoint, "cluster")
        s3_default = {"public_url": f"{endpoint}/{bucket}/fluxserve/", "endpoint_url": endpoint,
                      "region_name": "us-east-1", "aws_access_key_id": DUMMY_ACCESS_KEY,
                      "aws_secret_access_key": DUMMY_SECRET_KEY, "image_directory": f"{bucket}/fluxserve"}
        common = {"FLUXSERVE_DATABASE_URL": database_url, "FLUXSERVE_S3_DEFAULT": json.dumps(s3_default),
                  "FLUXSERVE_SECRET_KEY": "cluster-secret-" + "x" * 32, "FLUXSERVE_LEASE_SECONDS": "3",
                  "FLUXSERVE_HEARTBEAT_SECONDS": "0.5", "FLUXSERVE_MAX_QUEUED_PER_KEY": "1000",
                  "FLUXSERVE_MAX_JOB_ATTEMPTS": "10", "FLUXSERVE_SHUTDOWN_GRACE_SECONDS": "5"}
        apis = [ServerProcess(tmp_path / name, tiny_root, FLUXSERVE_RUN_WORKER="false", **common) for name in "ab"]
        workers = [WorkerProcess(tmp_path / name, tiny_root, FLUXSERVE_PUBLIC_BASE_URL=apis[0].base_url, **common)
                   for name in ("w1", "w2")]
        receiver = Receiver()
        stack.callback(receiver.shutdown)
        key = apis[0].create_key("cluster")
        for process in (*apis, *workers):
            process.start()
            stack.callback(process.stop)
        sessions = open_database(database_url)
        stack.callback(lambda: sessions.kw["bind"].dispose())

        def jobs() -> dict[int, Job]:
            with sessions() as session:
                return {job.id: job for job in session.scalars(select(Job))}

        sent: dict[str, tuple[int, int]] = {}  # track_id -> (the API it went to, its job id)

        def send(serials: range, to: list[int]) -> None:
            for serial in serials:
                api = to[serial % len(to)]
                track_id, job_id = submit(apis[api], key, serial, receiver.url)
                sent[track_id] = (api, job_id)

        send(range(0, JOBS // 2), [0, 1])
        wait_until(lambda: sum(j.status == "succeeded" for j in jobs().values()) >= 4, 300, "a few jobs done", 0.5)
        # one worker (with its worker process) and one API killed -9 while jobs run; the other API takes the load
        wait_until(lambda: any(j.status == "running" for j in jobs().values()), 120, "a running job", 0.1)
        workers[0].kill()
        apis[0].kill()
        killed_at = time.monotonic()
        send(range(JOBS // 2, 3 * JOBS // 4), [1])
        workers[0].start()
        apis[0].start()
        send(range(3 * JOBS // 4, JOBS), [0, 1])
        wait_until(lambda: all(j.status in ("succeeded", "failed", "cancelled") for j in jobs().values())
                   and len(jobs()) >= JOBS, 600, "every job to finish", 0.5)
        finished_at = time.monotonic()
        wait_until(lambda: len(receiver.received) >= JOBS, 120, "every webhook", 0.5)
        rows = jobs()
        with sessions() as session:
            deliveries = Counter(d.job_id for d in session.scalars(select(WebhookDelivery)))

        # exactly once: one job per logical request, every one succeeded, one finish (delivery row) each
        assert len(rows) == JOBS and Counter(job.track_id for job in rows.values()) == Counter(set(sent))
        assert {job.id: job.status for job in rows.values()} == {job_id: "succeeded" for _, job_id in sent.values()}
        assert deliveries == Counter(list(rows))  # one delivery row per job: no job was finished twice
        assert set(receiver.received) == set(rows)
        retried = sum(job.attempts > 1 for job in rows.values())

        # any API answers any job, images included: each fetched through the API it was NOT sent to
        s3 = s3_client(endpoint)
        with httpx.Client(timeout=60) as http:
            for api, job_id in sent.values():
                other = apis[1 - api]
                answer = http.post(other.base_url + FETCH.format(id=job_id), json={"key": key}).json()
                assert answer["status"] == "success" and len(answer["output"]) == 1, answer
                name = rows[job_id].output_names()[0]
                assert answer["output"] == [f"{s3_default['public_url']}{name}"]  # the bucket's URL
                stored = s3.get_object(Bucket=bucket, Key=f"fluxserve/{name}")["Body"].read()
                assert stored[:8] == b"\x89PNG\r\n\x1a\n"
                served = http.get(f"{other.base_url}/outputs/{name}")  # /outputs/ on a replica that never had it
                assert served.status_code == 200 and served.content == stored
    print(f"\n[cluster] {JOBS} jobs over 2 APIs and 2 workers, one of each killed -9: all succeeded once, "
          f"{retried} retried after the kill, {sum(receiver.received.values())} webhooks for {JOBS} jobs; "
          f"finished {finished_at - killed_at:.1f} s after the kills, {time.monotonic() - began:.1f} s in all")
