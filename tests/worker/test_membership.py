"""worker.membership: a running worker registers in the cluster's registry (with its GPU),
beats with what it holds and whether it is busy, runs the commands broadcast to every worker,
forgets dead workers, and leaves when it stops; on a real database, with the fake engine."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from sqlalchemy import update

from fluxserve.jobs.tables import WorkerRow, utcnow
from fluxserve.jobs.workers import WorkerRegistry
from fluxserve.worker.membership import Membership
from tests.support.waiting import wait_until
from tests.worker.conftest import FAST, running, wait_finished

LEASE = 30.0


def _member(sessions, gpu: str | None = "1") -> tuple[WorkerRegistry, Membership]:
    workers = WorkerRegistry(sessions)
    return workers, Membership(workers, gpu=gpu, every=0.05, lease_seconds=LEASE)


def test_a_running_worker_is_registered_with_its_gpu_beats_and_leaves_when_it_stops(make_worker, sessions,
                                                                                    registry, engine):
    workers, membership = _member(sessions, gpu="1")
    engine.load(registry.get("flux-klein"))
    worker = make_worker(replace(FAST, models=("flux-klein",)), membership=membership)
    with running(worker):
        (row,) = wait_until(lambda: workers.alive(LEASE), 5, "the worker to register")
        assert row.gpu == "1" and row.id == membership.worker_id
        first_beat = row.heartbeat_at
        (row,) = wait_until(lambda: [r for r in workers.alive(LEASE) if r.heartbeat_at > first_beat], 5, "a beat")
        assert row.status["state"] == "idle" and row.status["running"] == []
        assert row.status["gpu"] == "1" and row.status["model_group"] == ["flux-klein"]
        assert row.status["device"] == "fake"
    assert workers.alive(LEASE) == []  # left the registry on stopping


def test_a_busy_worker_says_so_with_its_job(make_worker, make_job, store, sessions, engine, registry):
    workers, membership = _member(sessions)
    engine.steps, engine.step_seconds = 20, 0.05  # a job of about a second
    worker = make_worker(membership=membership)
    job = make_job("slow")
    with running(worker):
        row = wait_until(lambda: next((r for r in workers.alive(LEASE) if r.status.get("state") == "busy"), None),
                         5, "a busy beat")
        assert row.status["running"] == [job.id]
        wait_finished(store, job.id)
        row = wait_until(lambda: next((r for r in workers.alive(LEASE)
                                       if r.status.get("state") == "idle" and r.status.get("jobs_done") == 1), None),
                         5, "an idle beat after the job")
        # the model it loaded for the job, by registry name, with every model sharing its weights
        klein = registry.get("flux-klein")
        assert "flux-klein" in row.models
        assert row.models == [spec.name for spec in registry.specs() if spec.pipeline_key == klein.pipeline_key]
        assert row.status["pipelines"] == [klein.pipeline_key]
    assert worker.busy is False


def test_a_broadcast_clear_cache_reaches_the_worker_once(make_worker, sessions, registry, engine):
    workers, membership = _member(sessions)
    workers.broadcast("clear_cache")  # sent before this worker started: not for it
    engine.load(registry.get("flux"))
    worker = make_worker(membership=membership)
    with running(worker):
        wait_until(lambda: workers.alive(LEASE), 5, "the worker to register")
        assert engine.cleared == 0
        workers.broadcast("clear_cache")
        wait_until(lambda: engine.cleared == 1, 5, "the cache to be cleared")
        assert engine.loaded() == []
        workers.broadcast("restart")  # a remote worker drops its models too
        wait_until(lambda: engine.cleared == 2, 5, "the restart to drop the models")
        workers.broadcast("no-such-command")  # ignored, with a warning
        first = membership._last_seen
        wait_until(lambda: membership._last_seen != first, 5, "the unknown command to be read")
    assert engine.cleared == 2


def test_a_worker_forgets_the_workers_that_stopped_beating(make_worker, sessions):
    workers, membership = _member(sessions)
    dead = workers.register(gpu="7")
    with sessions.begin() as session:
        session.execute(update(WorkerRow).where(WorkerRow.id == dead)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=LEASE + 5)))
    worker = make_worker(membership=membership)
    with running(worker):
        wait_until(lambda: [r.id for r in workers.alive(3600)] == [membership.worker_id], 5, "the dead row to go")


def test_beats_survive_a_database_outage(sessions):
    """A beat that fails is retried on the next one (the row is made again if a replica removed it)."""
    workers, membership = _member(sessions)
    membership._describe = lambda: (["flux"], {"state": "idle"})  # as Worker.cluster_status answers
    membership.tick()
    (row,) = workers.alive(LEASE)
    workers.leave(row.id)  # e.g. removed as dead by a replica while this worker was paused
    broken = {"on": True}
    real_beat = workers.beat

    def beat(*args, **kwargs):
        if broken["on"]:
            raise ConnectionError("database away")
        return real_beat(*args, **kwargs)

    workers.beat = beat  # type: ignore[method-assign]
    membership.tick()  # fails quietly
    assert workers.alive(LEASE) == []
    broken["on"] = False
    membership.tick()
    (again,) = workers.alive(LEASE)
    assert again.id == row.id and again.models == ["flux"]
