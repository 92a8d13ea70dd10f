"""worker.loop's stop (a SIGTERM to the server): ``request_stop`` stops claiming at once, lets
the job (or batch) in hand finish within the grace period, and otherwise puts it back in the
queue without counting the attempt; ``release_held`` puts back at once what the worker holds."""

from __future__ import annotations

import threading
import time

from fluxserve.jobs.tables import utcnow
from fluxserve.worker import WorkerConfig
from fluxserve.worker.finish import FinisherThread
from fluxserve.worker.messages import Outcome
from tests.support.waiting import wait_until
from tests.worker.conftest import FAST, job_row

HOOK = "https://client.example/hook"


def run_in_thread(worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    worker._thread = thread  # worker.alive / join / the fixture's cleanup see it
    thread.start()
    return thread


def generating(store, job_id: int) -> bool:
    row = job_row(store, job_id)
    return row.status == "running" and row.progress_step >= 1


def assert_back_in_the_queue(row) -> None:
    """Queued again, claimable now, the attempt and the wait not counted, nothing recorded."""
    assert row.status == "queued" and row.claim_token is None
    assert row.attempts == 0 and row.waits == 0
    assert row.not_before is None or row.not_before.replace(tzinfo=None) <= utcnow().replace(tzinfo=None)
    assert row.error is None and row.finished_at is None and row.outputs == []


def test_request_stop_claims_nothing_more_and_lets_the_job_in_hand_finish(make_worker, make_job, store, engine, sink):
    engine.steps, engine.step_seconds = 20, 0.02
    first, *queued = [make_job(f"job {i}", webhook=HOOK) for i in range(3)]
    worker = make_worker()
    thread = run_in_thread(worker)
    wait_until(lambda: generating(store, first.id), 10, "the first job to generate")
    worker.request_stop(grace_seconds=30)
    thread.join(10)
    assert not thread.is_alive()
    assert job_row(store, first.id).status == "succeeded"
    for job in queued:  # the loop looked before claiming: nothing was claimed after the stop
        row = job_row(store, job.id)
        assert row.status == "queued" and row.started_at is None and row.attempts == 0
    assert [r.job_id for r in sink.started()] == [first.id]


def test_past_the_grace_period_the_job_goes_back_to_the_queue_uncounted(make_worker, make_job, store, engine, sink):
    engine.steps, engine.step_seconds = 500, 0.01  # 5 s: longer than the grace period
    job = make_job(webhook=HOOK)
    worker = make_worker()
    thread = run_in_thread(worker)
    wait_until(lambda: generating(store, job.id), 10, "the job to generate")
    started = time.monotonic()
    worker.request_stop(grace_seconds=0.3)
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 2.0
    assert_back_in_the_queue(job_row(store, job.id))
    assert [(r.job_id, r.outcome) for r in sink.finished()] == [(job.id, Outcome.RELEASED)]
    assert store.claim_next().id == job.id  # claimable at once: no lease, no backoff to wait out


def test_a_batch_past_the_grace_period_goes_back_whole(make_worker, make_job, store, engine, sink):
    engine.steps, engine.step_seconds = 500, 0.01
    jobs = [make_job(f"a{i}", seeds=[i], batch_key="k") for i in range(3)]
    worker = make_worker(config=WorkerConfig(max_batch_size=3, heartbeat_seconds=0.05, idle_poll_seconds=0.02))
    thread = run_in_thread(worker)
    wait_until(lambda: all(generating(store, job.id) for job in jobs), 10, "the batch to generate")
    worker.request_stop(grace_seconds=0.2)
    thread.join(10)
    assert not thread.is_alive()
    for job in jobs:
        assert_back_in_the_queue(job_row(store, job.id))
    assert len(engine.batch_calls) == 1 and engine.calls == []  # not retried one by one
    assert sorted(r.job_id for r in sink.finished() if r.outcome is Outcome.RELEASED) == [job.id for job in jobs]


def test_a_stop_requested_from_outside_is_seen_before_the_first_claim(make_worker, make_job, store):
    """The worker process's ``stop_requested`` (the server's event, or a signal it got itself)."""
    job = make_job()
    asked = threading.Event()
    asked.set()
    worker = make_worker(stop_requested=asked.is_set)
    thread = run_in_thread(worker)
    thread.join(5)
    assert not thread.is_alive()
    assert job_row(store, job.id).status == "queued"


def test_request_stop_ends_an_idle_worker_at_once_and_only_the_first_call_counts(make_worker):
    worker = make_worker(config=WorkerConfig(idle_poll_seconds=5.0, heartbeat_seconds=0.05))
    run_in_thread(worker)
    time.sleep(0.1)  # waiting on its commands for up to 5 s
    started = time.monotonic()
    worker.request_stop(grace_seconds=60)
    worker.request_stop(grace_seconds=0)  # changes nothing: the grace period already runs
    assert worker.join(2) and time.monotonic() - started < 1.0
    assert not worker._grace_over.is_set()


def test_release_held_puts_the_running_job_back_at_once(make_worker, make_job, store, engine, sink):
    engine.steps, engine.step_seconds = 300, 0.01
    job = make_job()
    worker = make_worker(config=FAST)
    thread = run_in_thread(worker)
    wait_until(lambda: generating(store, job.id), 10, "the job to generate")
    worker.request_stop(grace_seconds=60)  # stopping, with time to spare: then a second signal
    assert worker.release_held() == [job.id]
    assert_back_in_the_queue(job_row(store, job.id))
    # the generation finds its claim gone at its next heartbeat and stops, recording nothing
    thread.join(10)
    assert not thread.is_alive()
    assert [r.outcome for r in sink.finished()] == [Outcome.RELEASED, Outcome.LOST]
    assert_back_in_the_queue(job_row(store, job.id))


def test_finisher_close_is_bounded():
    finisher = FinisherThread()
    release = threading.Event()
    finisher.put(release.wait)  # a task that hangs until released
    started = time.monotonic()
    assert finisher.close(timeout=0.2) is False
    assert time.monotonic() - started < 1.0
    release.set()
    finisher2 = FinisherThread()
    done: list[int] = []
    finisher2.put(lambda: done.append(1))
    assert finisher2.close(timeout=5) is True and done == [1]
