"""Which storage a job's images go to: a key's S3 details (set with update_s3, secret key
encrypted at rest, per deploy type), the server-wide default bucket, or local disk only. The
deploy type of a job is its API path family's (``api.paths``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from fluxserve.jobs.database import rowcount
from fluxserve.jobs.tables import StorageConfig, utcnow
from fluxserve.secretbox import SecretBox, SecretBoxError
from fluxserve.storage.base import Storage
from fluxserve.storage.s3 import S3Details, S3Storage, S3Uploader
from fluxserve.storage.shared import SharedImages

DEFAULT_DEPLOY_TYPE = "text_to_image"


class StorageUnavailable(RuntimeError):
    """The S3 details a job was queued with are gone; the message is safe to show."""


class StorageConfigs:
    def __init__(self, sessions: sessionmaker[Session], secrets: SecretBox, default: S3Details | None = None,
                 uploader: S3Uploader | None = None):
        self._sessions = sessions
        self._secrets = secrets
        self.default = default
        self.uploader = uploader or S3Uploader()
        # the server's own copies of inputs and outputs, readable by every replica and worker
        self.shared = SharedImages(default, self.uploader) if default is not None else None

    def put(self, key_id: int, deploy_type: str, details: S3Details) -> StorageConfig:
        """Create or replace the key's details for ``deploy_type``."""
        with self._sessions.begin() as session:
            row = session.scalar(select(StorageConfig).where(
                StorageConfig.key_id == key_id, StorageConfig.deploy_type == deploy_type))
            if row is None:
                row = StorageConfig(key_id=key_id, deploy_type=deploy_type)
                session.add(row)
            row.bucket, row.prefix = details.bucket, details.prefix
            row.endpoint_url, row.region_name = details.endpoint_url, details.region_name
            row.public_url, row.access_key_id = details.public_url, details.access_key_id
            row.secret_encrypted = self._secrets.encrypt(details.secret_access_key)
            row.updated_at = utcnow()
        return row

    def remove(self, key_id: int, deploy_type: str) -> bool:
        with self._sessions.begin() as session:
            return bool(rowcount(session.execute(delete(StorageConfig).where(
                StorageConfig.key_id == key_id, StorageConfig.deploy_type == deploy_type))))

    def for_job(self, key_id: int, deploy_type: str | None) -> dict[str, Any] | None:
        """The storage decision recorded in a new job's params (None: local disk): the key's
        details for the job's deploy type, else for text_to_image, else the server default."""
        wanted = [deploy_type or DEFAULT_DEPLOY_TYPE, DEFAULT_DEPLOY_TYPE]
        with self._sessions() as session:
            rows = {row.deploy_type: row for row in session.scalars(
                select(StorageConfig).where(StorageConfig.key_id == key_id, StorageConfig.deploy_type.in_(wanted)))}
        for deploy_type in wanted:
            if deploy_type in rows:
                return {"config_id": rows[deploy_type].id, "public_url": rows[deploy_type].public_url}
        if self.default is not None:
            return {"config_id": None, "public_url": self.default.public_url}
        return None

    def storage(self, remote: dict[str, Any]) -> Storage:
        """Where a job that recorded ``remote`` (``for_job``) keeps its images."""
        return S3Storage(self.details(remote), self.uploader)

    def for_details(self, details: S3Details) -> Storage:
        return S3Storage(details, self.uploader)

    def details(self, remote: dict[str, Any]) -> S3Details:
        """The S3 details a job recorded (decrypting the secret)."""
        if remote.get("config_id") is None:
            if self.default is None:
                raise StorageUnavailable("Upload failed: the server's default S3 bucket is no longer configured")
            return self.default
        with self._sessions() as session:
            row = session.get(StorageConfig, remote["config_id"])
        if row is None:
            raise StorageUnavailable("Upload failed: the S3 details were removed (reset_s3) before the images were uploaded")
        try:
            secret = self._secrets.decrypt(row.secret_encrypted)
        except SecretBoxError:
            raise StorageUnavailable(
                "Upload failed: the stored S3 secret cannot be decrypted (the server secret changed); "
                "send update_s3 again") from None
        return S3Details(
            endpoint_url=row.endpoint_url, region_name=row.region_name, bucket=row.bucket, prefix=row.prefix,
            public_url=row.public_url, access_key_id=row.access_key_id, secret_access_key=secret,
        )
