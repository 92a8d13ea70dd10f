"""Each ScaledObject's query, exactly as rendered, run against a real PostgreSQL holding fluxserve's
own schema and jobs made by fluxserve's own job store: it returns the number of workers its group
wants, running jobs + ceil(queued / per-worker backlog), as a non-NULL integer (KEDA's pgx scan
into a float64 refuses NULL)."""

from __future__ import annotations

import math
import re
import uuid
from collections import Counter

import psycopg
import pytest
from sqlalchemy import update

from fluxserve.jobs.database import open_database
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import Job
from fluxserve.keys import KeyStore
from fluxserve.models import DEFAULT_REGISTRY
from tests.deploy.manifests import by_kind
from tests.support.postgres import create_database

# Queued jobs per extra worker, per group: the divisor written in each query.
BACKLOG_PER_WORKER = {"worker-klein": 4, "worker-flux": 2}


def queries(example) -> dict[str, str]:
    return {name: scaled["spec"]["triggers"][0]["metadata"]["query"] for name, scaled in by_kind(example, "ScaledObject").items()}


def group_models(query: str) -> set[str]:
    (listed,) = re.findall(r"model IN \(([^)]*)\)", query)
    return {item.strip().strip("'") for item in listed.split(",")}


def run(url: str, query: str) -> object:
    """As KEDA does: one row, one column, from a plain connection with the rendered string."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(query).fetchall()
    assert len(rows) == 1 and len(rows[0]) == 1, rows
    return rows[0][0]


@pytest.fixture
def database(postgres_server):
    url = create_database(postgres_server, f"deploy_keda_{uuid.uuid4().hex[:12]}")
    sessions = open_database(url)  # fluxserve's own schema, as the API and workers create it
    key, _ = KeyStore(sessions).create("keda")
    return url, sessions, JobStore(sessions), key.id


def add_jobs(sessions, store: JobStore, key_id: int, jobs: list[tuple[str, JobStatus]]) -> None:
    """Jobs queued by the store (as the API queues them), then moved to their status."""
    for index, (model, status) in enumerate(jobs):
        job = store.create(key_id=key_id, server="v6", model=model, task="text2img", params={"seeds": [index]},
                           meta={}, file_prefix=f"deploy-{index}")
        if status is not JobStatus.QUEUED:
            with sessions.begin() as session:
                session.execute(update(Job).where(Job.id == job.id).values(status=status.value))


def expected(jobs: list[tuple[str, JobStatus]], models: set[str], per_worker: int) -> int:
    counts = Counter(status for model, status in jobs if model in models)
    return counts[JobStatus.RUNNING] + math.ceil(counts[JobStatus.QUEUED] / per_worker)


def test_the_divisors_are_the_ones_in_the_queries(example):
    for name, query in queries(example).items():
        assert f"/ {BACKLOG_PER_WORKER[name]}.0)" in query, name


def test_an_empty_queue_wants_no_worker_and_is_not_null(example, database):
    url, *_ = database
    for name, query in queries(example).items():
        value = run(url, query)
        assert value == 0 and isinstance(value, int), f"{name}: {value!r}"


def test_each_query_counts_its_groups_running_and_queued_jobs(example, database):
    url, sessions, store, key_id = database
    statuses = list(JobStatus)
    # every model in every status, and more of some
    jobs = [(model, status) for model in DEFAULT_REGISTRY for status in statuses]
    jobs += [("flux-klein", JobStatus.QUEUED)] * 3 + [("realtime", JobStatus.RUNNING)] * 2
    jobs += [("flux-kontext-dev", JobStatus.QUEUED)] * 2 + [("flux-fill", JobStatus.SUCCEEDED)] * 4
    add_jobs(sessions, store, key_id, jobs)
    for name, query in queries(example).items():
        models = group_models(query)
        want = expected(jobs, models, BACKLOG_PER_WORKER[name])
        assert run(url, query) == want, name
    # counted by hand, so that the expectation is checked too
    assert run(url, queries(example)["worker-klein"]) == 4 + math.ceil(5 / 4)  # 4 running, 5 queued
    assert run(url, queries(example)["worker-flux"]) == 3 + math.ceil(5 / 2)  # 3 running, 5 queued


def test_busy_workers_are_never_counted_away(example, database):
    """The queue empties while jobs still run: the count never drops below the running jobs, so
    KEDA never asks for fewer workers than are generating (a queued-only count would ask for 0)."""
    url, sessions, store, key_id = database
    add_jobs(sessions, store, key_id, [("flux", JobStatus.RUNNING)] * 3 + [("flux-klein", JobStatus.RUNNING)])
    assert run(url, queries(example)["worker-flux"]) == 3
    assert run(url, queries(example)["worker-klein"]) == 1


def test_finished_jobs_and_other_groups_do_not_count(example, database):
    url, sessions, store, key_id = database
    finished = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]
    add_jobs(sessions, store, key_id, [(model, status) for model in DEFAULT_REGISTRY for status in finished])
    add_jobs(sessions, store, key_id, [("realtime", JobStatus.QUEUED)])
    assert run(url, queries(example)["worker-flux"]) == 0
    assert run(url, queries(example)["worker-klein"]) == 1  # one queued job: activation (> 0) starts a worker
