"""SQLAlchemy tables: API keys, jobs, webhook deliveries. Ids are AUTOINCREMENT (SQLite) /
identity (PostgreSQL), so an id is never reused, even after rows are deleted or a restart.
Columns added after the first release carry server defaults or are nullable, so that
``database.upgrade_schema`` can add them to an existing database in place."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings; not enough to use the key
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # signs this key's webhooks (HMAC-SHA256); must be readable to sign, so stored as is
    webhook_secret: Mapped[str | None] = mapped_column(String(80), nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_key_started", "key_id", "started_at"),  # fair share: when each key was last served
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    server: Mapped[str] = mapped_column(String(32))  # API family that took it: flux_klein, v6, ...
    model: Mapped[str] = mapped_column(String(64))  # registry name
    task: Mapped[str] = mapped_column(String(16))  # text2img | img2img
    status: Mapped[str] = mapped_column(String(16), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)  # everything the worker needs
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)  # what the client is shown
    file_prefix: Mapped[str] = mapped_column(String(64))
    outputs: Mapped[list[Any]] = mapped_column(JSON, default=list)  # stored file names
    nsfw_detected: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    generation_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # -- durability, webhooks, retention, progress ------------------------------------------
    webhook: Mapped[str | None] = mapped_column(Text, nullable=True)
    track_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    claim_token: Mapped[str | None] = mapped_column(String(36), nullable=True)  # the live attempt
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    progress_step: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    progress_total: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    expired_at: Mapped[datetime | None] = mapped_column(nullable=True)
    output_urls: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)  # set when stored remotely (S3)
    batch_key: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)  # jobs that may share a call
    # a job put back because a dependency was away (disk, object store) waits until then
    not_before: Mapped[datetime | None] = mapped_column(nullable=True)
    waits: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))  # times put back that way

    def output_names(self) -> list[str]:
        """The file names of this job's images (one per seed): fixed when it is queued, so
        future_links are exact and a retry overwrites the same files."""
        return [f"{self.file_prefix}-{i}.png" for i in range(len(self.params["seeds"]))]

    @property
    def base64_files(self) -> bool:
        """``base64: true`` answered ModelsLab's way: each image also as a text file of its
        base64, whose URL is the answer's ``output`` (unless the server answers inline strings)."""
        return bool(self.params.get("base64")) and not self.params.get("base64_inline")

    def base64_names(self) -> list[str]:
        return [name.removesuffix(".png") + ".base64" for name in self.output_names()]


class IdempotencyKey(Base):
    """A client's ``Idempotency-Key`` (per API key) and the job it created: the same key with the
    same request answers that job again; with another request it is refused. Written in the
    transaction that creates the job, so neither exists without the other."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("key_id", "value"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    value: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the request as parsed
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class StorageConfig(Base):
    """A key's S3 details (ModelsLab's update_s3), per deploy type; the secret key encrypted."""

    __tablename__ = "storage_configs"
    __table_args__ = (UniqueConstraint("key_id", "deploy_type"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    deploy_type: Mapped[str] = mapped_column(String(40))
    bucket: Mapped[str] = mapped_column(String(255))
    prefix: Mapped[str] = mapped_column(String(1024))
    endpoint_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    region_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    public_url: Mapped[str] = mapped_column(String(2048))
    access_key_id: Mapped[str] = mapped_column(String(256))
    secret_encrypted: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One webhook POST to make, persisted in the same transaction that finishes the job, so
    it survives any crash; retried until delivered or its retry period ends."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | delivered | failed | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # since it was queued (or last replayed)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    give_up_at: Mapped[datetime] = mapped_column()  # the end of the retry window
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # -- concurrent delivery, dead letters ---------------------------------------------------
    # "scheme://host[:port]" of the URL (never its path or query): the per-host limit counts
    # POSTs in flight per receiver; NULL on rows from older releases (filled in when claimed)
    receiver: Mapped[str | None] = mapped_column(String(300), nullable=True)
    claim_token: Mapped[str | None] = mapped_column(String(36), nullable=True)  # the attempt in flight
    gave_up_at: Mapped[datetime | None] = mapped_column(nullable=True)  # when it became failed or dead
    replays: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))  # by an admin
