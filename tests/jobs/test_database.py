"""Upgrading a database that an older fluxserve created, on SQLite and a real PostgreSQL:
``open_database`` adds the columns and tables that newer code defines, keeps every row, and
is a no-op the second time."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fluxserve.jobs.database import open_database, upgrade_schema
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import Base, utcnow
from fluxserve.keys import KeyStore
from tests.support.postgres import create_database

_db_names = itertools.count(1)

NEW_JOB_COLUMNS = {"webhook", "track_id", "claim_token", "heartbeat_at", "progress_step", "progress_total",
                   "expires_at", "expired_at", "output_urls", "batch_key", "not_before", "waits"}
CREATED = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


# -- the tables as the previous release defined them (before durability and webhooks) --------------
class OldBase(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class OldApiKey(OldBase):
    __tablename__ = "api_keys"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class OldJob(OldBase):
    __tablename__ = "jobs"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    server: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    file_prefix: Mapped[str] = mapped_column(String(64))
    outputs: Mapped[list[Any]] = mapped_column(JSON, default=list)
    nsfw_detected: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    generation_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def test_old_tables_lack_exactly_the_new_columns():
    """Guards the copy above: it is the current schema minus what the upgrade must add."""
    current = {table.name: {column.name for column in table.columns} for table in Base.metadata.sorted_tables}
    old = {table.name: {column.name for column in table.columns} for table in OldBase.metadata.sorted_tables}
    assert current["jobs"] - old["jobs"] == NEW_JOB_COLUMNS and old["jobs"] <= current["jobs"]
    assert current["api_keys"] - old["api_keys"] == {"webhook_secret"} and old["api_keys"] <= current["api_keys"]
    assert set(current) - set(old) == {"webhook_deliveries", "storage_configs", "idempotency_keys"}


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return create_database(request.getfixturevalue("postgres_server"), f"upgrade_{next(_db_names)}")


def raw_engine(url: str):
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed)


@pytest.fixture
def old_database(db_url):
    """A database as the previous release left it: one key, and a queued, a running and a
    succeeded job. Returns the ids."""
    engine = raw_engine(db_url)
    OldBase.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        key = OldApiKey(name="legacy", key_hash="h" * 64, prefix="fs_legacy1", is_admin=False, created_at=CREATED)
        session.add(key)
        session.flush()
        common = dict(key_id=key.id, server="flux_klein", model="tiny-flux", task="text2img",
                      meta={"prompt": "an old cat"}, file_prefix="old", created_at=CREATED)
        queued = OldJob(status="queued", params={"prompt": "an old cat", "seed": 7, "inputs": ["in.png"]},
                        outputs=[], **common)
        running = OldJob(status="running", params={"prompt": "interrupted"}, outputs=[], attempts=1,
                         started_at=CREATED + timedelta(seconds=5), **common)
        done = OldJob(status="succeeded", params={"prompt": "done"}, outputs=["old-0.png"], nsfw_detected=True,
                      generation_time=3.25, attempts=1, started_at=CREATED + timedelta(seconds=1),
                      finished_at=CREATED + timedelta(seconds=4), **common)
        session.add_all([queued, running, done])
        session.flush()
        ids = {"key": key.id, "queued": queued.id, "running": running.id, "done": done.id}
    engine.dispose()
    return ids


def columns(engine, table: str) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns(table)}


def indexes(engine, table: str) -> set[str]:
    return {index["name"] for index in inspect(engine).get_indexes(table)}


# -- tests ----------------------------------------------------------------------------------------
def test_open_database_upgrades_an_old_schema_and_keeps_its_rows(old_database, open_db, db_url):
    engine = raw_engine(db_url)
    try:
        assert columns(engine, "jobs").isdisjoint(NEW_JOB_COLUMNS)
        assert "webhook_secret" not in columns(engine, "api_keys")
        assert "webhook_deliveries" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()

    sessions = open_db()
    engine = sessions.kw["bind"]
    assert NEW_JOB_COLUMNS <= columns(engine, "jobs")
    assert "webhook_secret" in columns(engine, "api_keys")
    assert "webhook_deliveries" in inspect(engine).get_table_names()
    for table in Base.metadata.sorted_tables:
        assert columns(engine, table.name) == {column.name for column in table.columns}

    store, keys = JobStore(sessions), KeyStore(sessions)
    key = keys.get(old_database["key"])
    assert (key.name, key.prefix, key.webhook_secret, key.created_at) == ("legacy", "fs_legacy1", None, CREATED)
    assert keys.webhook_secret(key.id).startswith("whsec_")  # old keys get a secret on first use

    old = store.get(old_database["queued"], old_database["key"])
    assert old.status == JobStatus.QUEUED.value and old.attempts == 0
    assert old.params == {"prompt": "an old cat", "seed": 7, "inputs": ["in.png"]}
    assert old.meta == {"prompt": "an old cat"} and old.outputs == [] and old.file_prefix == "old"
    assert old.created_at == CREATED and old.created_at.tzinfo is not None
    assert (old.progress_step, old.progress_total) == (0, 0)
    assert old.webhook is None and old.track_id is None and old.claim_token is None
    assert old.heartbeat_at is None and old.expires_at is None and old.expired_at is None

    done = store.get(old_database["done"])
    assert done.status == JobStatus.SUCCEEDED.value and done.outputs == ["old-0.png"] and done.nsfw_detected
    assert done.generation_time == 3.25 and done.finished_at == CREATED + timedelta(seconds=4)
    assert done.progress_step == 0 and store.webhook_status(done.id) == ""
    assert store.due_for_expiry() == []  # jobs from before retention existed never expire by themselves
    assert store.active_inputs() == {"in.png"}
    assert store.queued_count(key.id) == 1 and store.running_count() == 1
    assert store.oldest_queued_age() > 0

    # the old queued job runs to completion under the new protocol
    claimed = store.claim_next()
    assert claimed.id == old.id and claimed.attempts == 1 and claimed.claim_token
    assert store.heartbeat(old.id, claimed.claim_token, 2, 4)
    expires = utcnow() + timedelta(hours=1)
    assert store.succeed(old.id, claimed.claim_token, outputs=["old-q.png"], nsfw_detected=False,
                         generation_time=1.5, meta={"seed": 7}, expires_at=expires)
    finished = store.get(old.id)
    assert finished.status == JobStatus.SUCCEEDED.value and finished.outputs == ["old-q.png"]
    assert (finished.progress_step, finished.progress_total) == (2, 4) and finished.expires_at == expires

    # new jobs (with webhooks) work alongside the old rows, and get ids after them
    new = store.create(key_id=key.id, server="v6", model="m", task="text2img", params={}, meta={},
                       file_prefix="new", webhook="https://client.example/hook", track_id="t")
    assert new.id > max(old_database["queued"], old_database["running"], old_database["done"])
    assert store.cancel(new.id)
    assert store.webhook_status(new.id) == "pending"


def test_opening_an_upgraded_database_again_is_a_no_op(old_database, open_db):
    first = open_db()
    store = JobStore(first)
    before = {job_id: store.get(job_id) for job_id in (old_database["queued"], old_database["done"])}
    schema = {table: columns(first.kw["bind"], table) for table in inspect(first.kw["bind"]).get_table_names()}
    first.kw["bind"].dispose()

    second = open_db()
    engine = second.kw["bind"]
    assert upgrade_schema(engine) == []  # nothing left to add
    assert {table: columns(engine, table) for table in inspect(engine).get_table_names()} == schema
    store = JobStore(second)
    for job_id, job in before.items():
        again = store.get(job_id)
        assert {c.key: getattr(again, c.key) for c in again.__table__.columns} == \
            {c.key: getattr(job, c.key) for c in job.__table__.columns}


def test_upgrade_schema_reports_what_it_added(old_database, db_url):
    engine = raw_engine(db_url)
    try:
        added = upgrade_schema(engine)
        assert sorted(added) == sorted([f"jobs.{name}" for name in NEW_JOB_COLUMNS] + ["api_keys.webhook_secret"]
                                       + ["ix_jobs_heartbeat_at", "ix_jobs_expires_at", "ix_jobs_batch_key"])
        assert upgrade_schema(engine) == []
    finally:
        engine.dispose()


def test_a_fresh_database_needs_no_upgrade(open_db):
    sessions = open_db()
    assert upgrade_schema(sessions.kw["bind"]) == []


def test_a_job_running_when_the_old_release_stopped_is_recovered(old_database, open_db):
    store = JobStore(open_db())
    running = store.get(old_database["running"])
    assert running.status == JobStatus.RUNNING.value and running.heartbeat_at is None
    assert store.recover_stale(lease_seconds=60, max_attempts=3) == ([running.id], [])
    assert store.get(running.id).status == JobStatus.QUEUED.value


def test_an_upgraded_database_has_the_indexes_of_a_fresh_one(old_database, open_db, tmp_path):
    upgraded = open_db().kw["bind"]
    fresh = open_database(f"sqlite:///{tmp_path / 'fresh.db'}").kw["bind"]
    try:
        assert {"ix_jobs_heartbeat_at", "ix_jobs_expires_at"} <= indexes(fresh, "jobs")
        assert indexes(upgraded, "jobs") >= indexes(fresh, "jobs")
    finally:
        fresh.dispose()
