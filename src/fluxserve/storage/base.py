"""What the service asks of a place that keeps images: local disk (``storage.local``) or an
S3-compatible bucket (``storage.s3``). The worker writes through this protocol and never knows
which one it has; ``storage.configs`` picks the one a job was queued for."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Storage(Protocol):
    def save(self, name: str, data: bytes, content_type: str = "image/png") -> str:
        """Keep ``data`` as ``name`` (completely or not at all) and return its public URL."""
        ...

    def url_for(self, name: str) -> str:
        """The public URL ``name`` has, or will have once saved."""
        ...

    def read(self, name: str) -> bytes:
        """The bytes kept as ``name``; FileNotFoundError if there are none."""
        ...

    def check(self) -> None:
        """Raise (with a message safe to show) if this storage can't be written now."""
        ...

    def delete(self, name: str) -> None:
        """Remove ``name`` if it is there (best effort: never raises for a missing one)."""
        ...
