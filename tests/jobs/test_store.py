"""The job store against both backends: SQLite (a file) and a real throwaway PostgreSQL."""

from __future__ import annotations

import itertools
import threading

import pytest
from sqlalchemy import delete, select

from fluxserve.jobs.database import open_database
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import ApiKey, Job
from fluxserve.keys import KeyStore
from tests.support.postgres import PostgresUnavailable, create_database, postgres_required, running_postgres

_db_names = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """URL of a PostgreSQL server for the whole run (skipped if absent, unless required)."""
    try:
        with running_postgres(tmp_path_factory.mktemp("postgres")) as url:
            yield url
    except PostgresUnavailable as exc:
        if postgres_required():
            pytest.fail(f"FLUXSERVE_REQUIRE_POSTGRES=1 but {exc}")
        pytest.skip(str(exc))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty database for each test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    server = request.getfixturevalue("postgres_server")
    return create_database(server, f"store_{next(_db_names)}")


@pytest.fixture
def open_db(db_url):
    """open_database(db_url), callable several times (a 'restart'); engines are disposed after."""
    opened = []

    def _open():
        sessions = open_database(db_url)
        opened.append(sessions)
        return sessions

    yield _open
    for sessions in opened:
        sessions.kw["bind"].dispose()


@pytest.fixture
def sessions(open_db):
    return open_db()


@pytest.fixture
def store(sessions):
    return JobStore(sessions)


@pytest.fixture
def key_id(sessions):
    return KeyStore(sessions).create("tester")[0].id


def add_job(store: JobStore, key_id: int, model: str = "tiny-flux", **extra) -> Job:
    return store.create(
        key_id=key_id, server="flux_klein", model=model, task="text2img",
        params={"prompt": "a cat", "seed": 1, **extra}, meta={"prompt": "a cat"}, file_prefix="abc",
    )


def claim_and_succeed(store: JobStore, generation_time: float) -> int:
    job = store.claim_next()
    assert store.succeed(job.id, outputs=["x.png"], nsfw_detected=False, generation_time=generation_time, meta={})
    return job.id


def test_create_and_get_scoped_by_key(store, sessions, key_id):
    other_key = KeyStore(sessions).create("other")[0].id
    job = add_job(store, key_id, steps=4)
    assert job.id is not None

    got = store.get(job.id)
    assert got.status == JobStatus.QUEUED.value
    assert (got.key_id, got.server, got.model, got.task) == (key_id, "flux_klein", "tiny-flux", "text2img")
    assert got.params == {"prompt": "a cat", "seed": 1, "steps": 4}
    assert got.meta == {"prompt": "a cat"}
    assert got.outputs == [] and got.attempts == 0 and got.error is None
    assert got.created_at is not None and got.started_at is None and got.finished_at is None

    assert store.get(job.id, key_id).id == job.id
    assert store.get(job.id, other_key) is None
    assert store.get(job.id + 1000) is None
    assert store.get(job.id + 1000, key_id) is None


def test_ids_increase_and_are_never_reused(open_db, sessions, store, key_id):
    ids = [add_job(store, key_id).id for _ in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5

    with sessions.begin() as session:  # drop the newest rows
        session.execute(delete(Job).where(Job.id.in_(ids[-2:])))
    after_delete = add_job(store, key_id).id
    assert after_delete > ids[-1]

    with sessions.begin() as session:  # drop every row, then "restart"
        session.execute(delete(Job))
    sessions.kw["bind"].dispose()
    reopened = open_db()
    after_restart = JobStore(reopened).create(
        key_id=key_id, server="v6", model="m", task="img2img", params={}, meta={}, file_prefix="p",
    ).id
    assert after_restart > after_delete
    with reopened() as session:
        assert session.scalars(select(Job.id)).all() == [after_restart]

    # API key ids follow the same rule.
    keys = KeyStore(reopened)
    first = keys.create("a")[0].id
    with reopened.begin() as session:
        session.execute(delete(ApiKey).where(ApiKey.id == first))
    assert KeyStore(open_db()).create("b")[0].id > first


def test_claim_next_is_fifo(store, key_id):
    assert store.claim_next() is None
    ids = [add_job(store, key_id).id for _ in range(3)]

    claimed = [store.claim_next() for _ in range(3)]
    assert [job.id for job in claimed] == ids
    for job in claimed:
        assert job.status == JobStatus.RUNNING.value
        assert job.attempts == 1
        assert job.started_at is not None
    assert store.claim_next() is None
    assert store.queue_depth() == 0


def test_concurrent_claims_give_each_job_to_one_worker(open_db, store, key_id):
    ids = [add_job(store, key_id).id for _ in range(40)]
    workers = 4
    # Each worker has its own engine, like separate worker processes would.
    stores = [JobStore(open_db()) for _ in range(workers)]
    start = threading.Barrier(workers)
    claimed: list[list[int]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            start.wait()
            while (job := stores[n].claim_next()) is not None:
                claimed[n].append(job.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    everything = [job_id for ids_ in claimed for job_id in ids_]
    assert sorted(everything) == ids  # every job exactly once
    for ids_ in claimed:
        assert ids_ == sorted(ids_)  # each worker sees the queue in FIFO order
    for job_id in ids:
        job = store.get(job_id)
        assert job.status == JobStatus.RUNNING.value and job.attempts == 1


def test_succeed_only_from_running_and_only_once(store, key_id):
    job = add_job(store, key_id)
    assert not store.succeed(job.id, outputs=["a.png"], nsfw_detected=False, generation_time=1.0, meta={})
    assert store.get(job.id).status == JobStatus.QUEUED.value

    store.claim_next()
    assert store.succeed(
        job.id, outputs=["a.png", "b.png"], nsfw_detected=True, generation_time=2.5, meta={"seed": 7},
    )
    done = store.get(job.id)
    assert done.status == JobStatus.SUCCEEDED.value
    assert done.outputs == ["a.png", "b.png"] and done.nsfw_detected is True
    assert done.generation_time == 2.5 and done.meta == {"seed": 7} and done.finished_at is not None

    assert not store.succeed(job.id, outputs=["c.png"], nsfw_detected=False, generation_time=9.0, meta={})
    assert not store.fail(job.id, "too late")
    again = store.get(job.id)
    assert again.status == JobStatus.SUCCEEDED.value
    assert again.outputs == ["a.png", "b.png"] and again.generation_time == 2.5
    assert again.meta == {"seed": 7} and again.error is None and again.finished_at == done.finished_at

    assert not store.succeed(job.id + 1000, outputs=[], nsfw_detected=False, generation_time=1.0, meta={})


def test_fail_only_from_running_and_only_once(store, key_id):
    job = add_job(store, key_id)
    assert not store.fail(job.id, "not started")
    assert store.get(job.id).status == JobStatus.QUEUED.value and store.get(job.id).error is None

    store.claim_next()
    assert store.fail(job.id, "out of memory")
    failed = store.get(job.id)
    assert failed.status == JobStatus.FAILED.value and failed.error == "out of memory"
    assert failed.finished_at is not None

    assert not store.fail(job.id, "second failure")
    assert not store.succeed(job.id, outputs=["a.png"], nsfw_detected=False, generation_time=1.0, meta={})
    again = store.get(job.id)
    assert again.status == JobStatus.FAILED.value and again.error == "out of memory"
    assert again.outputs == [] and again.finished_at == failed.finished_at


def test_requeue_interrupted(store, key_id):
    first = add_job(store, key_id).id
    second = add_job(store, key_id).id
    waiting = add_job(store, key_id).id
    finished = add_job(store, key_id).id

    assert store.requeue_interrupted(max_attempts=2) == (0, 0)  # nothing running

    assert store.claim_next().id == first
    assert store.claim_next().id == second
    assert store.claim_next().id == waiting
    assert store.succeed(waiting, outputs=["w.png"], nsfw_detected=False, generation_time=1.0, meta={})
    # "crash": first and second are running (attempt 1)
    assert store.requeue_interrupted(max_attempts=2) == (2, 0)
    for job_id in (first, second):
        job = store.get(job_id)
        assert job.status == JobStatus.QUEUED.value and job.attempts == 1 and job.error is None
    assert store.get(waiting).status == JobStatus.SUCCEEDED.value
    assert store.get(finished).status == JobStatus.QUEUED.value

    # FIFO by id still: the requeued jobs come before the one queued after them
    assert store.claim_next().id == first
    assert store.get(first).attempts == 2
    # "crash" again: first reached max attempts and fails; nothing else is running
    assert store.requeue_interrupted(max_attempts=2) == (0, 1)
    gave_up = store.get(first)
    assert gave_up.status == JobStatus.FAILED.value and gave_up.attempts == 2
    assert gave_up.finished_at is not None and "interrupted 2 times" in gave_up.error
    assert not store.succeed(first, outputs=[], nsfw_detected=False, generation_time=1.0, meta={})

    assert [store.get(j).status for j in (second, finished)] == [JobStatus.QUEUED.value] * 2
    assert store.queue_depth() == 2


def test_requeue_interrupted_with_one_attempt_fails_at_once(store, key_id):
    job = add_job(store, key_id).id
    store.claim_next()
    assert store.requeue_interrupted(max_attempts=1) == (0, 1)
    assert store.get(job).status == JobStatus.FAILED.value


def test_jobs_ahead_and_queue_depth(store, key_id):
    assert store.queue_depth() == 0
    ids = [add_job(store, key_id).id for _ in range(4)]
    assert [store.jobs_ahead(j) for j in ids] == [0, 1, 2, 3]
    assert store.queue_depth() == 4

    store.claim_next()  # running jobs are still ahead of the others
    assert store.jobs_ahead(ids[3]) == 3
    assert store.queue_depth() == 3

    store.succeed(ids[0], outputs=[], nsfw_detected=False, generation_time=1.0, meta={})
    assert store.jobs_ahead(ids[3]) == 2
    store.claim_next()
    store.fail(ids[1], "boom")
    assert store.jobs_ahead(ids[3]) == 1
    assert store.jobs_ahead(ids[2]) == 0
    assert store.queue_depth() == 2


def test_recent_generation_time(store, key_id):
    assert store.recent_generation_time("tiny-flux") is None

    add_job(store, key_id, model="tiny-flux")
    add_job(store, key_id, model="other")
    add_job(store, key_id, model="tiny-flux")
    claim_and_succeed(store, 2.0)  # tiny-flux
    claim_and_succeed(store, 100.0)  # other
    failed = store.claim_next()  # tiny-flux, fails: not counted
    store.fail(failed.id, "boom")
    assert store.recent_generation_time("tiny-flux") == pytest.approx(2.0)
    assert store.recent_generation_time("other") == pytest.approx(100.0)

    for _ in range(3):
        add_job(store, key_id, model="tiny-flux")
    for seconds in (4.0, 6.0, 8.0):
        claim_and_succeed(store, seconds)
    assert store.recent_generation_time("tiny-flux") == pytest.approx(5.0)  # (2+4+6+8)/4
    assert store.recent_generation_time("tiny-flux", limit=2) == pytest.approx(7.0)  # newest two
    assert store.recent_generation_time("missing") is None
