"""The cluster's worker registry and its broadcast commands, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from fluxserve.jobs.tables import WorkerRow, utcnow
from fluxserve.jobs.workers import WorkerRegistry


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'workers.db'}"
    from tests.support.postgres import create_database

    return create_database(request.getfixturevalue("postgres_server"), f"workers_{abs(hash(tmp_path)) % 10**8}")


@pytest.fixture
def registry(open_db):
    return WorkerRegistry(open_db())


def test_workers_register_beat_and_leave(registry):
    a = registry.register(gpu="0")
    b = registry.register(gpu="1")
    registry.beat(a, ["flux-klein"], {"device": "cuda", "running": [7]})
    alive = {row.id: row for row in registry.alive(15)}
    assert set(alive) == {a, b}
    assert alive[a].models == ["flux-klein"] and alive[a].status["running"] == [7] and alive[a].gpu == "0"
    registry.leave(b)
    assert [row.id for row in registry.alive(15)] == [a]


def test_silent_workers_are_dead_and_forgotten(registry, open_db):
    quiet, busy = registry.register(), registry.register()
    with open_db().begin() as session:
        session.execute(update(WorkerRow).where(WorkerRow.id == quiet)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert [row.id for row in registry.alive(15)] == [busy]
    assert registry.forget_dead(30) == 1
    registry.beat(quiet, [], {})  # it was only paused: its next beat brings it back
    assert {row.id for row in registry.alive(15)} == {quiet, busy}


def test_commands_reach_every_worker_once(registry):
    start = registry.last_command_id()
    first = registry.broadcast("clear_cache")
    second = registry.broadcast("restart")
    assert registry.commands_after(start) == [(first, "clear_cache"), (second, "restart")]
    assert registry.commands_after(second) == []
    assert registry.last_command_id() == second


def test_live_workers_are_counted_per_model_group(registry, open_db):
    every = registry.register(gpu="0")
    klein = registry.register(gpu="1")
    flux = registry.register(gpu="2")
    registry.beat(every, [], {"model_group": None})
    registry.beat(klein, [], {"model_group": ["flux-klein", "realtime"]})
    registry.beat(flux, [], {"model_group": ["flux"]})
    dead = registry.register(gpu="3")
    with open_db().begin() as session:
        session.execute(update(WorkerRow).where(WorkerRow.id == dead).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    assert registry.count_alive(15) == 3
    assert registry.count_alive(15, "flux-klein") == 2  # the group's worker and the one claiming every model
    assert registry.count_alive(15, "flux") == 2
    assert registry.count_alive(15, "flux-fill") == 1
