"""The job store against both backends: SQLite (a file) and a real throwaway PostgreSQL."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, select, update

from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.store import JobStore, next_job_query
from fluxserve.jobs.tables import ApiKey, Job, WebhookDelivery, utcnow
from fluxserve.keys import KeyStore
from tests.support.postgres import create_database

_db_names = itertools.count(1)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty database for each test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    server = request.getfixturevalue("postgres_server")
    return create_database(server, f"store_{next(_db_names)}")


@pytest.fixture
def sessions(open_db):
    return open_db()


@pytest.fixture
def store(sessions):
    return JobStore(sessions)


@pytest.fixture
def key_id(sessions):
    return KeyStore(sessions).create("tester")[0].id


HOOK = "https://client.example/hook"


def add_job(store: JobStore, key_id: int, model: str = "tiny-flux", *, webhook: str | None = None,
            track_id: str | None = None, **extra) -> Job:
    return store.create(
        key_id=key_id, server="flux_klein", model=model, task="text2img",
        params={"prompt": "a cat", "seed": 1, **extra}, meta={"prompt": "a cat"}, file_prefix="abc",
        webhook=webhook, track_id=track_id,
    )


def succeed(store: JobStore, job_id: int, token: str | None, generation_time: float = 1.0, **extra) -> bool:
    values = {"outputs": ["x.png"], "nsfw_detected": False, "generation_time": generation_time, "meta": {}}
    return store.succeed(job_id, token, **{**values, **extra})


def claim_and_succeed(store: JobStore, generation_time: float) -> int:
    job = store.claim_next()
    assert succeed(store, job.id, job.claim_token, generation_time)
    return job.id


def make_stale(sessions, job_id: int, seconds: float = 3600.0) -> None:
    """Pretend the worker running `job_id` stopped heart-beating `seconds` ago."""
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def deliveries(sessions, job_id: int | None = None) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).order_by(WebhookDelivery.id)
    if job_id is not None:
        query = query.where(WebhookDelivery.job_id == job_id)
    with sessions() as session:
        return list(session.scalars(query))


def snapshot(job: Job) -> dict:
    """Every column of a job row, to check that a refused call left it untouched."""
    return {column.key: getattr(job, column.key) for column in Job.__table__.columns}


def is_aware_utc(value: datetime | None) -> bool:
    return value is not None and value.utcoffset() == timedelta(0)


# -- creating and reading -------------------------------------------------------------------------
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
    assert is_aware_utc(got.created_at)
    assert got.webhook is None and got.track_id is None and got.claim_token is None and got.heartbeat_at is None
    assert (got.progress_step, got.progress_total) == (0, 0)
    assert got.expires_at is None and got.expired_at is None
    assert store.webhook_status(job.id) == ""

    assert store.get(job.id, key_id).id == job.id
    assert store.get(job.id, other_key) is None
    assert store.get(job.id + 1000) is None
    assert store.get(job.id + 1000, key_id) is None


def test_create_with_webhook_and_track_id(store, sessions, key_id):
    job = add_job(store, key_id, webhook=HOOK, track_id="track-9")
    got = store.get(job.id)
    assert (got.webhook, got.track_id) == (HOOK, "track-9")
    assert deliveries(sessions) == []  # nothing to deliver before the job finishes
    assert store.webhook_status(job.id) == ""


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


# -- claiming -------------------------------------------------------------------------------------
def test_claim_next_is_fifo_with_a_fresh_token_per_claim(store, key_id):
    assert store.claim_next() is None
    ids = [add_job(store, key_id).id for _ in range(3)]

    before = utcnow()
    claimed = [store.claim_next() for _ in range(3)]
    assert [job.id for job in claimed] == ids
    for job in claimed:
        assert job.status == JobStatus.RUNNING.value
        assert job.attempts == 1
        assert is_aware_utc(job.started_at) and job.started_at >= before - timedelta(seconds=1)
        assert job.heartbeat_at == job.started_at
        assert str(uuid.UUID(job.claim_token)) == job.claim_token
        assert job.progress_step == 0
    assert len({job.claim_token for job in claimed}) == 3
    assert store.claim_next() is None
    assert store.queue_depth() == 0


def test_concurrent_claims_give_each_job_to_one_worker(open_db, store, key_id):
    ids = [add_job(store, key_id).id for _ in range(40)]
    workers = 4
    # Each worker has its own engine, like separate worker processes would.
    stores = [JobStore(open_db()) for _ in range(workers)]
    start = threading.Barrier(workers)
    claimed: list[list[Job]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            start.wait()
            while (job := stores[n].claim_next()) is not None:
                claimed[n].append(job)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    everything = [job.id for jobs in claimed for job in jobs]
    assert sorted(everything) == ids  # every job exactly once
    for jobs in claimed:
        assert [job.id for job in jobs] == sorted(job.id for job in jobs)  # each worker sees FIFO order
    tokens = {job.id: job.claim_token for jobs in claimed for job in jobs}
    assert len(set(tokens.values())) == len(ids)
    for job_id in ids:
        job = store.get(job_id)
        assert job.status == JobStatus.RUNNING.value and job.attempts == 1
        assert job.claim_token == tokens[job_id]  # the token the winner was handed is the live one


# -- finishing ------------------------------------------------------------------------------------
def test_succeed_only_from_running_with_its_token_and_only_once(store, key_id):
    job = add_job(store, key_id)
    assert not succeed(store, job.id, None)
    assert not succeed(store, job.id, str(uuid.uuid4()))
    assert store.get(job.id).status == JobStatus.QUEUED.value

    token = store.claim_next().claim_token
    running = store.get(job.id)
    assert not succeed(store, job.id, str(uuid.uuid4()))  # running, but not this attempt's token
    assert not succeed(store, job.id, None)
    assert snapshot(store.get(job.id)) == snapshot(running)

    expires = utcnow() + timedelta(hours=1)
    assert store.succeed(
        job.id, token, outputs=["a.png", "b.png"], nsfw_detected=True, generation_time=2.5, meta={"seed": 7},
        expires_at=expires,
    )
    done = store.get(job.id)
    assert done.status == JobStatus.SUCCEEDED.value
    assert done.outputs == ["a.png", "b.png"] and done.nsfw_detected is True
    assert done.generation_time == 2.5 and done.meta == {"seed": 7} and is_aware_utc(done.finished_at)
    assert done.expires_at == expires and is_aware_utc(done.expires_at)
    assert done.claim_token is None and done.expired_at is None

    assert not store.succeed(job.id, token, outputs=["c.png"], nsfw_detected=False, generation_time=9.0, meta={})
    assert not store.fail(job.id, token, "too late")
    assert snapshot(store.get(job.id)) == snapshot(done)

    assert not succeed(store, job.id + 1000, token)


def test_fail_only_from_running_with_its_token_and_only_once(store, key_id):
    job = add_job(store, key_id)
    assert not store.fail(job.id, None, "not started")
    assert store.get(job.id).status == JobStatus.QUEUED.value and store.get(job.id).error is None

    token = store.claim_next().claim_token
    assert not store.fail(job.id, str(uuid.uuid4()), "someone else's attempt")
    assert store.get(job.id).status == JobStatus.RUNNING.value and store.get(job.id).error is None
    assert store.fail(job.id, token, "out of memory")
    failed = store.get(job.id)
    assert failed.status == JobStatus.FAILED.value and failed.error == "out of memory"
    assert is_aware_utc(failed.finished_at) and failed.claim_token is None

    assert not store.fail(job.id, token, "second failure")
    assert not succeed(store, job.id, token)
    assert snapshot(store.get(job.id)) == snapshot(failed)
    assert not store.fail(job.id + 1000, token, "no such job")


@pytest.mark.parametrize("how", ["succeed", "fail", "cancel", "recover"])
def test_a_finished_job_cannot_be_finished_again_by_any_token(store, sessions, key_id, how):
    job = add_job(store, key_id, webhook=HOOK, track_id="t-1")
    token = None
    if how == "cancel":
        assert store.cancel(job.id)
    else:
        token = store.claim_next().claim_token
        if how == "succeed":
            assert succeed(store, job.id, token, webhook_payload={"status": "success", "id": job.id})
        elif how == "fail":
            assert store.fail(job.id, token, "boom")
        else:
            assert store.recover(job.id, token, max_attempts=1) == "failed"
    finished = store.get(job.id)
    assert JobStatus(finished.status).is_terminal
    rows = [(row.id, row.payload) for row in deliveries(sessions, job.id)]
    assert len(rows) == 1

    for candidate in (token, None, "", str(uuid.uuid4())):
        assert not succeed(store, job.id, candidate, webhook_payload={"status": "success", "id": job.id})
        assert not store.fail(job.id, candidate, "again")
        assert not store.heartbeat(job.id, candidate, 5, 10)
        assert store.recover(job.id, candidate, max_attempts=1) is None
        assert store.recover(job.id, candidate, max_attempts=5) is None
    assert not store.cancel(job.id)
    assert store.cancel_queued() == []
    assert store.recover_stale(0, 1) == ([], [])
    assert store.claim_next() is None
    assert snapshot(store.get(job.id)) == snapshot(finished)
    assert [(row.id, row.payload) for row in deliveries(sessions, job.id)] == rows  # no second webhook


def test_zombie_worker_with_a_stale_token_changes_nothing(store, sessions, key_id):
    """A worker presumed dead (its job was recovered and claimed again) wakes up: its token
    no longer counts, so it can neither keep the claim alive nor finish the job."""
    job_id = add_job(store, key_id, webhook=HOOK, track_id="zombie").id
    token_a = store.claim_next().claim_token
    make_stale(sessions, job_id)
    assert store.recover_stale(lease_seconds=60, max_attempts=3) == ([job_id], [])

    # between the recovery and the next claim, the old token is already dead
    queued = store.get(job_id)
    assert queued.status == JobStatus.QUEUED.value and queued.claim_token is None
    assert not store.heartbeat(job_id, token_a, 1, 4)
    assert not succeed(store, job_id, token_a)
    assert snapshot(store.get(job_id)) == snapshot(queued)

    second = store.claim_next()
    token_b = second.claim_token
    assert second.id == job_id and second.attempts == 2 and token_b != token_a
    running = store.get(job_id)

    assert not store.heartbeat(job_id, token_a, 3, 4)
    assert not succeed(store, job_id, token_a, webhook_payload={"status": "success", "from": "zombie"})
    assert not store.fail(job_id, token_a, "zombie failure")
    assert store.recover(job_id, token_a, max_attempts=3) is None
    assert store.recover(job_id, token_a, max_attempts=1) is None
    assert snapshot(store.get(job_id)) == snapshot(running)  # row untouched
    assert deliveries(sessions, job_id) == []

    assert store.heartbeat(job_id, token_b, 2, 4)
    payload = {"status": "success", "id": job_id, "output": ["b.png"], "track_id": "zombie"}
    assert store.succeed(job_id, token_b, outputs=["b.png"], nsfw_detected=False, generation_time=1.5, meta={"n": 2},
                         webhook_payload=payload)
    done = store.get(job_id)
    assert done.status == JobStatus.SUCCEEDED.value and done.outputs == ["b.png"] and done.meta == {"n": 2}
    assert [row.payload for row in deliveries(sessions, job_id)] == [payload]

    # the zombie is still refused once the job is finished
    assert not succeed(store, job_id, token_a)
    assert not store.fail(job_id, token_a, "zombie failure")
    assert snapshot(store.get(job_id)) == snapshot(done)
    assert len(deliveries(sessions, job_id)) == 1


# -- heartbeats and recovery ----------------------------------------------------------------------
def test_heartbeat_records_progress_and_only_for_the_live_attempt(store, key_id):
    queued = add_job(store, key_id)
    assert not store.heartbeat(queued.id, None)
    job = store.claim_next()
    first_beat = store.get(job.id).heartbeat_at

    time.sleep(0.01)
    assert store.heartbeat(job.id, job.claim_token, 3, 10)
    beat = store.get(job.id)
    assert (beat.progress_step, beat.progress_total) == (3, 10)
    assert is_aware_utc(beat.heartbeat_at) and beat.heartbeat_at > first_beat

    assert store.heartbeat(job.id, job.claim_token)  # no progress given: progress kept
    assert (store.get(job.id).progress_step, store.get(job.id).progress_total) == (3, 10)
    assert store.heartbeat(job.id, job.claim_token, step=4)
    assert (store.get(job.id).progress_step, store.get(job.id).progress_total) == (4, 10)

    assert not store.heartbeat(job.id, str(uuid.uuid4()), 9, 10)
    assert not store.heartbeat(job.id + 1000, job.claim_token, 9, 10)
    assert store.get(job.id).progress_step == 4

    assert succeed(store, job.id, job.claim_token)
    assert not store.heartbeat(job.id, job.claim_token, 10, 10)
    assert store.get(job.id).progress_step == 4


def test_recover_stale_requeues_only_running_jobs_past_their_lease(store, sessions, key_id):
    first = add_job(store, key_id).id
    second = add_job(store, key_id).id
    alive = add_job(store, key_id).id
    done = add_job(store, key_id).id
    waiting = add_job(store, key_id).id

    assert store.recover_stale(lease_seconds=60, max_attempts=2) == ([], [])  # nothing running

    claims = {store.claim_next().id: None for _ in range(4)}
    assert list(claims) == [first, second, alive, done]
    assert succeed(store, done, store.get(done).claim_token)
    assert store.recover_stale(lease_seconds=60, max_attempts=2) == ([], [])  # every heartbeat is fresh

    # the workers running first and second stop heart-beating; alive's worker keeps going
    make_stale(sessions, first)
    make_stale(sessions, second, seconds=61)
    make_stale(sessions, done)  # finished jobs are never recovered, whatever their heartbeat
    alive_token = store.get(alive).claim_token
    assert store.recover_stale(lease_seconds=60, max_attempts=2) == ([first, second], [])
    for job_id in (first, second):
        job = store.get(job_id)
        assert job.status == JobStatus.QUEUED.value and job.attempts == 1 and job.error is None
        assert job.claim_token is None and job.finished_at is None
    still = store.get(alive)
    assert still.status == JobStatus.RUNNING.value and still.claim_token == alive_token
    assert store.get(done).status == JobStatus.SUCCEEDED.value
    assert store.get(waiting).status == JobStatus.QUEUED.value
    assert store.recover_stale(lease_seconds=60, max_attempts=2) == ([], [])  # once only

    # FIFO by id still: the requeued jobs come before the one queued after them
    again = store.claim_next()
    assert again.id == first and again.attempts == 2
    # its worker dies too: first used its 2 attempts and fails
    make_stale(sessions, first)
    assert store.recover_stale(lease_seconds=60, max_attempts=2) == ([], [first])
    gave_up = store.get(first)
    assert gave_up.status == JobStatus.FAILED.value and gave_up.attempts == 2 and gave_up.claim_token is None
    assert is_aware_utc(gave_up.finished_at) and "during all 2 attempt(s)" in gave_up.error
    assert not succeed(store, first, again.claim_token)

    assert [store.get(j).status for j in (second, waiting)] == [JobStatus.QUEUED.value] * 2
    assert store.queue_depth() == 2 and store.running_count() == 1


def test_recover_stale_with_one_attempt_fails_at_once(store, sessions, key_id):
    job = add_job(store, key_id).id
    store.claim_next()
    make_stale(sessions, job)
    assert store.recover_stale(lease_seconds=30, max_attempts=1) == ([], [job])
    assert store.get(job).status == JobStatus.FAILED.value


def test_recover_stale_with_a_zero_lease_takes_every_running_job(store, key_id):
    jobs = [add_job(store, key_id).id for _ in range(2)]
    queued = add_job(store, key_id).id
    store.claim_next()
    store.claim_next()
    time.sleep(0.01)  # the heartbeats are now strictly in the past
    assert store.recover_stale(lease_seconds=0, max_attempts=3) == (jobs, [])
    assert store.queued_count() == 3 and store.running_count() == 0
    assert store.get(queued).attempts == 0


def test_a_heartbeat_keeps_a_job_from_being_recovered(store, sessions, key_id):
    job = add_job(store, key_id).id
    token = store.claim_next().claim_token
    make_stale(sessions, job)
    assert store.heartbeat(job, token, 1, 8)
    assert store.recover_stale(lease_seconds=60, max_attempts=3) == ([], [])
    assert store.get(job).status == JobStatus.RUNNING.value and store.get(job).claim_token == token


def test_recover_requeues_then_fails_after_max_attempts(store, sessions, key_id):
    job_id = add_job(store, key_id, webhook=HOOK, track_id="rec-1").id
    assert store.recover(job_id, None, max_attempts=2) is None  # queued: nothing to recover
    assert store.recover(job_id + 1000, None, max_attempts=2) is None

    token = store.claim_next().claim_token
    assert store.recover(job_id, str(uuid.uuid4()), max_attempts=2) is None  # not the live attempt
    assert store.get(job_id).status == JobStatus.RUNNING.value
    assert store.recover(job_id, token, max_attempts=2) == "requeued"
    requeued = store.get(job_id)
    assert requeued.status == JobStatus.QUEUED.value and requeued.attempts == 1 and requeued.claim_token is None
    assert store.recover(job_id, token, max_attempts=2) is None  # only once
    assert deliveries(sessions, job_id) == [] and store.webhook_status(job_id) == ""

    token = store.claim_next().claim_token
    assert store.recover(job_id, token, max_attempts=2) == "failed"
    failed = store.get(job_id)
    message = "Generation was interrupted: the worker stopped during all 2 attempt(s); giving up. Please try again."
    assert failed.status == JobStatus.FAILED.value and failed.error == message
    assert failed.attempts == 2 and failed.claim_token is None and is_aware_utc(failed.finished_at)
    assert store.recover(job_id, token, max_attempts=2) is None

    rows = deliveries(sessions, job_id)
    assert [row.payload for row in rows] == [
        {"status": "failed", "id": job_id, "message": message, "track_id": "rec-1"}
    ]
    assert (rows[0].url, rows[0].key_id, rows[0].status) == (HOOK, key_id, "pending")
    assert store.webhook_status(job_id) == "pending"


def test_recover_to_failed_without_webhook_writes_no_delivery(store, sessions, key_id):
    job_id = add_job(store, key_id).id
    token = store.claim_next().claim_token
    assert store.recover(job_id, token, max_attempts=1) == "failed"
    assert deliveries(sessions) == [] and store.webhook_status(job_id) == ""


# -- webhooks -------------------------------------------------------------------------------------
def test_webhook_rows_are_written_once_per_finish(sessions, key_id):
    store = JobStore(sessions, webhook_retry_seconds=600)
    ok = add_job(store, key_id, webhook=HOOK, track_id="t-ok").id
    bad = add_job(store, key_id, webhook=HOOK + "/2", track_id="t-bad").id
    cancelled = add_job(store, key_id, webhook=HOOK, track_id="t-cancel").id
    plain_ok = add_job(store, key_id).id
    plain_bad = add_job(store, key_id).id
    plain_cancelled = add_job(store, key_id).id

    payload = {"status": "success", "id": ok, "output": ["https://x/o.png"], "track_id": "t-ok", "meta": {"a": 1}}
    before = utcnow()
    assert succeed(store, ok, store.claim_next().claim_token, webhook_payload=payload)
    assert store.fail(bad, store.claim_next().claim_token, "out of memory")
    assert store.cancel(cancelled, message="Request was cancelled")
    # jobs without a webhook: no rows, even when a payload is given
    assert succeed(store, plain_ok, store.claim_next().claim_token, webhook_payload={"status": "success"})
    assert store.fail(plain_bad, store.claim_next().claim_token, "boom")
    assert store.cancel(plain_cancelled)

    rows = deliveries(sessions)
    assert [(row.job_id, row.payload) for row in rows] == [
        (ok, payload),
        (bad, {"status": "failed", "id": bad, "message": "out of memory", "track_id": "t-bad"}),
        (cancelled, {"status": "failed", "id": cancelled, "message": "Request was cancelled", "track_id": "t-cancel"}),
    ]
    assert [row.url for row in rows] == [HOOK, HOOK + "/2", HOOK]
    for row in rows:
        assert row.key_id == key_id and row.status == "pending" and row.attempts == 0
        assert row.last_error is None and row.delivered_at is None
        assert is_aware_utc(row.next_attempt_at) and row.next_attempt_at >= before - timedelta(seconds=1)
        assert row.give_up_at - row.next_attempt_at == timedelta(seconds=600)

    for job_id in (ok, bad, cancelled):
        assert store.webhook_status(job_id) == "pending"
    for job_id in (plain_ok, plain_bad, plain_cancelled):
        assert store.webhook_status(job_id) == ""
        assert store.get(job_id).status != JobStatus.QUEUED.value


def test_succeed_without_a_payload_for_a_webhook_job_is_refused_and_rolled_back(store, sessions, key_id):
    job_id = add_job(store, key_id, webhook=HOOK).id
    running = store.claim_next()
    with pytest.raises(ValueError, match="webhook payload"):
        succeed(store, job_id, running.claim_token)
    assert snapshot(store.get(job_id)) == snapshot(store.get(running.id))
    assert store.get(job_id).status == JobStatus.RUNNING.value and store.get(job_id).claim_token == running.claim_token
    assert deliveries(sessions) == []
    payload = {"status": "success", "id": job_id}
    assert succeed(store, job_id, running.claim_token, webhook_payload=payload)  # the attempt can still finish
    assert [row.payload for row in deliveries(sessions)] == [payload]


def test_webhook_status_reflects_the_newest_delivery(store, sessions, key_id):
    job_id = add_job(store, key_id, webhook=HOOK).id
    other_id = add_job(store, key_id, webhook=HOOK).id
    assert store.fail(job_id, store.claim_next().claim_token, "boom")
    assert store.fail(other_id, store.claim_next().claim_token, "boom")
    first, other = deliveries(sessions)
    assert store.webhook_status(job_id) == "pending"

    with sessions.begin() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == first.id).values(status="delivered"))
    assert store.webhook_status(job_id) == "delivered"
    assert store.webhook_status(other_id) == "pending"

    with sessions.begin() as session:  # a newer delivery for the same job (e.g. a re-send) wins
        now = utcnow()
        session.add(WebhookDelivery(job_id=job_id, key_id=key_id, url=HOOK, payload={}, status="failed",
                                    next_attempt_at=now, give_up_at=now))
    assert store.webhook_status(job_id) == "failed"
    assert store.webhook_status(other_id) == "pending"


# -- cancelling -----------------------------------------------------------------------------------
def test_cancel_only_queued_jobs_and_only_for_their_key(store, sessions, key_id):
    other_key = KeyStore(sessions).create("other")[0].id
    running = add_job(store, key_id).id
    queued = add_job(store, key_id, webhook=HOOK, track_id="c-1").id
    later = add_job(store, key_id).id
    token = store.claim_next().claim_token

    assert not store.cancel(running)  # running jobs are left alone
    assert not store.cancel(running, key_id)
    assert store.get(running).status == JobStatus.RUNNING.value and store.get(running).claim_token == token
    assert not store.cancel(queued, other_key)  # another key's job
    assert store.get(queued).status == JobStatus.QUEUED.value
    assert not store.cancel(queued + 1000)

    assert store.cancel(queued, key_id, message="cancelled by the client")
    gone = store.get(queued)
    assert gone.status == JobStatus.CANCELLED.value and gone.error == "cancelled by the client"
    assert is_aware_utc(gone.finished_at) and gone.attempts == 0
    assert not store.cancel(queued, key_id)  # only once
    assert [row.payload for row in deliveries(sessions)] == [
        {"status": "failed", "id": queued, "message": "cancelled by the client", "track_id": "c-1"}
    ]

    assert store.cancel(later)  # no key: any key's job (admin)
    assert store.get(later).error == "Request was cancelled"
    assert store.claim_next() is None  # cancelled jobs never run
    assert store.jobs_ahead(later) == 1  # only the running one
    assert succeed(store, running, token)


def test_cancel_queued_cancels_all_or_one_keys_queued_jobs(store, sessions, key_id):
    other_key = KeyStore(sessions).create("other")[0].id
    running = add_job(store, key_id).id
    mine = [add_job(store, key_id, webhook=HOOK).id, add_job(store, key_id).id]
    theirs = [add_job(store, other_key).id, add_job(store, other_key, webhook=HOOK).id]
    store.claim_next()

    assert store.cancel_queued(key_id=key_id) == mine
    assert [store.get(j).status for j in mine] == [JobStatus.CANCELLED.value] * 2
    assert [store.get(j).status for j in theirs] == [JobStatus.QUEUED.value] * 2
    assert store.queued_count(other_key) == 2 and store.queued_count(key_id) == 0

    assert store.cancel_queued() == theirs
    assert store.cancel_queued() == []
    assert [store.get(j).status for j in theirs] == [JobStatus.CANCELLED.value] * 2
    assert store.get(running).status == JobStatus.RUNNING.value
    assert store.queued_count() == 0 and store.running_count() == 1

    rows = deliveries(sessions)
    assert [row.job_id for row in rows] == [mine[0], theirs[1]]
    assert all(row.payload["status"] == "failed" and "queue cleared" in row.payload["message"] for row in rows)
    assert store.get(mine[0]).error == rows[0].payload["message"]


# -- counts ---------------------------------------------------------------------------------------
def test_queued_and_running_counts_and_oldest_queued_age(store, sessions, key_id):
    other_key = KeyStore(sessions).create("other")[0].id
    assert (store.queued_count(), store.running_count(), store.oldest_queued_age()) == (0, 0, 0.0)

    first = add_job(store, key_id).id
    add_job(store, key_id)
    add_job(store, other_key)
    assert (store.queued_count(), store.queued_count(key_id), store.queued_count(other_key)) == (3, 2, 1)
    assert store.queued_count(other_key + 1000) == 0
    age = store.oldest_queued_age()
    assert 0.0 <= age < 60

    with sessions.begin() as session:  # the oldest queued job has waited ten minutes
        session.execute(update(Job).where(Job.id == first).values(created_at=utcnow() - timedelta(minutes=10)))
    assert 595 <= store.oldest_queued_age() <= 660

    assert store.claim_next().id == first  # then it runs: the next one is the oldest
    assert 0.0 <= store.oldest_queued_age() < 60
    assert (store.queued_count(), store.queued_count(key_id), store.running_count()) == (2, 1, 1)
    assert store.queue_depth() == 2


def test_jobs_ahead_and_queue_depth(store, key_id):
    assert store.queue_depth() == 0
    ids = [add_job(store, key_id).id for _ in range(4)]
    assert [store.jobs_ahead(j) for j in ids] == [0, 1, 2, 3]
    assert store.queue_depth() == 4

    first = store.claim_next()  # running jobs are still ahead of the others
    assert store.jobs_ahead(ids[3]) == 3
    assert store.queue_depth() == 3

    assert succeed(store, ids[0], first.claim_token)
    assert store.jobs_ahead(ids[3]) == 2
    second = store.claim_next()
    assert store.fail(ids[1], second.claim_token, "boom")
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
    store.fail(failed.id, failed.claim_token, "boom")
    assert store.recent_generation_time("tiny-flux") == pytest.approx(2.0)
    assert store.recent_generation_time("other") == pytest.approx(100.0)

    for _ in range(3):
        add_job(store, key_id, model="tiny-flux")
    for seconds in (4.0, 6.0, 8.0):
        claim_and_succeed(store, seconds)
    assert store.recent_generation_time("tiny-flux") == pytest.approx(5.0)  # (2+4+6+8)/4
    assert store.recent_generation_time("tiny-flux", limit=2) == pytest.approx(7.0)  # newest two
    assert store.recent_generation_time("missing") is None


# -- retention ------------------------------------------------------------------------------------
def test_due_for_expiry_and_mark_expired(store, key_id):
    now = utcnow()
    expiries = {
        "long_ago": now - timedelta(hours=2), "recently": now - timedelta(minutes=1),
        "future": now + timedelta(hours=1), "never": None,
    }
    ids = {}
    for name, expires in expiries.items():
        ids[name] = add_job(store, key_id).id
        job = store.claim_next()
        assert succeed(store, job.id, job.claim_token, expires_at=expires)
    failed = add_job(store, key_id).id  # failed and queued jobs have nothing to expire
    assert store.fail(failed, store.claim_next().claim_token, "boom")
    add_job(store, key_id)

    assert [job.id for job in store.due_for_expiry()] == [ids["long_ago"], ids["recently"]]  # oldest first
    assert [job.id for job in store.due_for_expiry(limit=1)] == [ids["long_ago"]]
    assert [job.id for job in store.due_for_expiry(now - timedelta(hours=1))] == [ids["long_ago"]]
    later = now + timedelta(hours=2)
    assert [job.id for job in store.due_for_expiry(later)] == [ids["long_ago"], ids["recently"], ids["future"]]
    due = store.due_for_expiry()[0]
    assert due.outputs == ["x.png"] and due.expires_at == expiries["long_ago"] and is_aware_utc(due.expires_at)
    # an aware "now" in another timezone means the same instant
    plus_two = timezone(timedelta(hours=2))
    assert [job.id for job in store.due_for_expiry(now.astimezone(plus_two))] == [ids["long_ago"], ids["recently"]]

    store.mark_expired(ids["long_ago"])
    expired = store.get(ids["long_ago"])
    assert is_aware_utc(expired.expired_at) and expired.status == JobStatus.SUCCEEDED.value
    assert [job.id for job in store.due_for_expiry()] == [ids["recently"]]
    stamp = expired.expired_at
    store.mark_expired(ids["long_ago"])  # only once: the first time stays recorded
    assert store.get(ids["long_ago"]).expired_at == stamp
    store.mark_expired(ids["recently"])
    assert store.due_for_expiry() == []
    store.mark_expired(failed)  # only succeeded jobs can expire
    assert store.get(failed).expired_at is None
    assert [job.id for job in store.due_for_expiry(later)] == [ids["future"]]


def test_active_inputs_of_queued_and_running_jobs_only(store, key_id):
    assert store.active_inputs() == set()
    add_job(store, key_id, inputs=["run-a.png", "run-b.png"], input_2="run-2.png")  # will run
    add_job(store, key_id, inputs=["done.png"], input_2="done-2.png")  # will succeed
    add_job(store, key_id, inputs=["failed.png"])  # will fail
    cancelled = add_job(store, key_id, inputs=["cancelled.png"]).id
    add_job(store, key_id, inputs=["queued.png"], input_2=None)
    add_job(store, key_id, inputs=[], input_2="queued-2.png")
    add_job(store, key_id)  # text2img: no inputs at all

    store.claim_next()
    done = store.claim_next()
    assert succeed(store, done.id, done.claim_token)
    failed = store.claim_next()
    assert store.fail(failed.id, failed.claim_token, "boom")
    assert store.cancel(cancelled)

    assert store.active_inputs() == {"run-a.png", "run-b.png", "run-2.png", "queued.png", "queued-2.png"}


# -- scheduling: fair share between keys, affinity to loaded models -------------------------------
def test_a_key_with_many_queued_jobs_does_not_block_another_keys_job(store, key_id, sessions):
    other = KeyStore(sessions).create("other")[0].id
    flood = [add_job(store, key_id).id for _ in range(20)]
    single = add_job(store, other).id
    first = store.claim_next()
    assert first.id == flood[0]
    assert store.claim_next().id == single  # not after the other 19: the other key was never served
    assert [store.claim_next().id for _ in range(3)] == flood[1:4]


def test_a_worker_prefers_jobs_for_the_models_it_holds_but_not_forever(store, key_id, sessions):
    old_other = add_job(store, key_id, model="flux").id
    mine = [add_job(store, key_id, model="flux-klein").id for _ in range(2)]
    assert store.claim_next(loaded=["flux-klein"], affinity_seconds=600).id == mine[0]  # no model swap
    with sessions.begin() as session:  # the flux job has now waited past the bound
        session.execute(update(Job).where(Job.id == old_other).values(created_at=utcnow() - timedelta(seconds=601)))
    assert store.claim_next(loaded=["flux-klein"], affinity_seconds=600).id == old_other  # no starvation
    assert store.claim_next(loaded=["flux-klein"], affinity_seconds=600).id == mine[1]


def test_a_worker_group_claims_only_its_models(store, key_id):
    flux = add_job(store, key_id, model="flux").id
    klein = add_job(store, key_id, model="flux-klein").id
    assert store.claim_next(models=["flux-klein", "realtime"]).id == klein
    assert store.claim_next(models=["flux-klein", "realtime"]) is None
    assert store.claim_next().id == flux


def test_release_puts_a_running_job_back_uncounted_and_a_stop_is_no_wait(store, key_id):
    """``release``: queued again, the attempt not counted; ``waited`` (a dependency's outage)
    grows the backoff, a worker's stop (``waited=False``) does not; only the live claim may."""
    job = add_job(store, key_id)
    claimed = store.claim_next()
    assert not store.release(job.id, "not-the-token", 0.0)
    assert store.release(job.id, claimed.claim_token, 0.0, waited=False)
    row = store.get(job.id)
    assert (row.status, row.attempts, row.waits, row.claim_token) == ("queued", 0, 0, None)
    assert store.claim_next().id == job.id  # no delay: claimable at once
    again = store.get(job.id)
    assert store.release(job.id, again.claim_token, 0.0)
    assert store.get(job.id).waits == 1
    assert not store.release(job.id, again.claim_token, 0.0)  # not running any more


def _plan_nodes(plan: dict) -> list[dict]:
    """Every node of a PostgreSQL JSON plan, depth first."""
    return [plan, *(node for child in plan.get("Plans", []) for node in _plan_nodes(child))]


def test_a_claim_looks_up_each_waiting_keys_last_service_once_not_once_per_queued_job(store, sessions, key_id, db_url):
    """The fair-share lookup (when a key was last served) ran as a correlated subquery for every
    queued row, so a claim's cost grew with the queue (bench/control_plane.py: ~60 ms at 10,000
    queued). PostgreSQL's own count of executions says it now runs once per waiting key."""
    if not db_url.startswith("postgresql"):
        pytest.skip("the executions counted are PostgreSQL's (EXPLAIN ANALYZE)")
    other = KeyStore(sessions).create("other")[0].id
    for index in range(60):
        add_job(store, key_id if index % 2 else other, model="flux" if index % 3 else "flux-klein")
    served = store.claim_next()  # one key has been served, the other not yet
    query = next_job_query(utcnow(), loaded=["flux-klein"], affinity_seconds=30).with_for_update(of=Job, skip_locked=True)
    with sessions() as session:
        compiled = query.compile(dialect=session.get_bind().dialect, compile_kwargs={"render_postcompile": True})
        (plan,), = session.connection().exec_driver_sql(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}", compiled.params).one()
    lookups = [node for node in _plan_nodes(plan["Plan"]) if node.get("Index Name") == "ix_jobs_key_started"
               or (node.get("Relation Name") == "jobs" and node.get("Alias") == "jobs_1")]
    assert lookups, plan  # the last-served lookup is in the plan
    assert max(node["Actual Loops"] for node in lookups) <= 2  # once per waiting key (2), not per queued job (59)
    assert store.claim_next(loaded=["flux-klein"], affinity_seconds=30).key_id != served.key_id  # fair share holds
