"""The service's dependencies (database, local disk, object store) and what a process knows of
their health: which failures are *transient* (the dependency is away: wait and retry) rather
than the job's own (bad input, a model error: fail it), and one log line when a dependency goes
away and one when it is back, instead of a traceback per attempt."""

from __future__ import annotations

import errno
import logging
import threading
import time
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)


class Dependency(str, Enum):
    DATABASE = "database"
    DISK = "disk"
    OBJECT_STORE = "object_store"


#: errno values that mean the disk can't take writes now (full, over quota, read-only, failing)
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def transient_dependency(exc: BaseException) -> Dependency | None:
    """The dependency whose absence caused ``exc`` (following its causes), or None when the
    failure is the job's own. Only causes a later retry can fix count."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _classify(current)
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return None


def _classify(exc: BaseException) -> Dependency | None:
    from sqlalchemy import exc as sa

    if isinstance(exc, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError, sa.TimeoutError)):
        return Dependency.DATABASE
    if isinstance(exc, sa.DBAPIError) and exc.connection_invalidated:
        return Dependency.DATABASE
    if getattr(exc, "transient_dependency", None) is not None:  # e.g. storage.s3.UploadError
        return Dependency(exc.transient_dependency)  # type: ignore[attr-defined]
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return Dependency.DISK
    return None


class Health:
    """Dependencies this process found away, since when and why. Thread-safe. Logs a warning
    when one goes away and an info line when it is back: an outage is two lines, not a
    traceback per poll."""

    def __init__(self, logger: logging.Logger | None = None):
        self._down: dict[Dependency, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._log = logger or log

    def down(self, dependency: Dependency, reason: str) -> bool:
        """Record ``dependency`` as away; True if it was up until now (then it is logged)."""
        with self._lock:
            if dependency in self._down:
                self._down[dependency]["reason"] = reason
                return False
            self._down[dependency] = {"since": time.time(), "reason": reason}
        self._log.warning("%s unavailable: %s; waiting for it (jobs wait, nothing fails)", dependency.value, reason)
        return True

    def up(self, dependency: Dependency) -> bool:
        """Record ``dependency`` as back; True if it was away (then it is logged)."""
        with self._lock:
            gone = self._down.pop(dependency, None)
        if gone is None:
            return False
        self._log.warning("%s is back after %.1fs", dependency.value, time.time() - gone["since"])
        return True

    def is_down(self, dependency: Dependency) -> bool:
        with self._lock:
            return dependency in self._down

    @property
    def degraded(self) -> bool:
        with self._lock:
            return bool(self._down)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{dependency: {"since": unix time, "for_seconds", "reason"}}`` for each one away."""
        now = time.time()
        with self._lock:
            return {dep.value: {"since": round(info["since"], 3), "for_seconds": round(now - info["since"], 1),
                                "reason": info["reason"]} for dep, info in self._down.items()}

    def down_dependencies(self) -> list[Dependency]:
        with self._lock:
            return list(self._down)
