"""Retention: the janitor that keeps disk use bounded.

One sweep does three things:

1. every succeeded job whose ``expires_at`` has passed loses its output files, then is marked
   expired (files first, row second: a crash in between only deletes again next time, it never
   leaves a row claiming "expired" over files still served); the row keeps its record;
2. init images in the inputs folder older than the retention period that no queued or running
   job still needs are deleted (they are content-addressed, so a later request re-stores them);
3. temporary files left by interrupted atomic writes (``.tmp-*``) older than an hour go.

With a server-wide bucket (``storage.shared``), the bucket's copies go the same way: an expired
job's outputs are deleted there too (before the row is marked), and the bucket's ``inputs/``
folder is swept like the local one (by the objects' upload dates, which the API refreshes each
time a request uses an input). Every replica's janitor does this; deletes are idempotent.

Only entries directly inside the two storage roots are touched, and symlinks are never followed:
an output name from the database goes through ``LocalStorage.path_for`` (no separators, no
``..``), removing a link removes the link only, and the folder scans consider regular files only.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fluxserve.dependencies import transient_dependency
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import utcnow
from fluxserve.storage.local import LocalStorage
from fluxserve.storage.shared import SharedImages

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"  # LocalStorage.save's mkstemp prefix
TEMP_MAX_AGE_SECONDS = 3600.0


@dataclass
class SweepResult:
    jobs_expired: int = 0
    files_deleted: int = 0  # output files of expired jobs
    inputs_deleted: int = 0  # unreferenced old init images
    objects_deleted: int = 0  # the shared bucket's copies of both (outputs of expired jobs, old inputs)
    temp_files_deleted: int = 0  # leftovers of interrupted atomic writes

    def __bool__(self) -> bool:  # "did this sweep do anything"
        return bool(self.jobs_expired or self.files_deleted or self.inputs_deleted or self.temp_files_deleted
                    or self.objects_deleted)


def _remove(path: Path) -> bool:
    """Remove a file (or a link, never its target). False if nothing was there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):  # not a file we made (and not served: the route wants a file)
        log.warning("retention: %s is a folder; left alone", path)
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:  # deleted meanwhile (another janitor): fine
        return False
    return True


class Janitor:
    """Deletes expired outputs, stale init images and stale temp files; ``start()`` runs
    ``sweep()`` every ``interval_seconds`` in a daemon thread until ``stop()``.

    ``on_deleted(job_id)``, if given, is called after a job's files were deleted and the job was
    marked expired (e.g. to wake anything caching it); its exceptions are logged, not raised."""

    def __init__(
        self, jobs: JobStore, outputs: LocalStorage, inputs: LocalStorage, *,
        retention_seconds: float, interval_seconds: float,
        on_deleted: Callable[[int], None] | None = None, shared: SharedImages | None = None,
    ):
        self.jobs = jobs
        self.shared = shared
        self.outputs = outputs
        self.inputs = inputs
        self.retention_seconds = float(retention_seconds)
        self.interval_seconds = float(interval_seconds)
        self.on_deleted = on_deleted
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one sweep at a time (thread and direct calls)

    # -- one pass ------------------------------------------------------------------------------
    def sweep(self, now: datetime | None = None) -> SweepResult:
        now = now or utcnow()
        result = SweepResult()
        with self._lock:
            self._expire_jobs(now, result)
            self._sweep_inputs(now.timestamp() - self.retention_seconds, result)
            temp_cutoff = now.timestamp() - TEMP_MAX_AGE_SECONDS
            for storage in (self.outputs, self.inputs):
                result.temp_files_deleted += self._sweep_folder(
                    storage.root, temp_cutoff, lambda name: name.startswith(TEMP_PREFIX)
                )
            self.jobs.forget_idempotency_keys(now)  # Idempotency-Keys name their job for 24 h
        if result:
            log.info(
                "retention: %d jobs expired, %d output files, %d init images, %d temp files, %d bucket objects deleted",
                result.jobs_expired, result.files_deleted, result.inputs_deleted, result.temp_files_deleted,
                result.objects_deleted,
            )
        return result

    def _expire_jobs(self, now: datetime, result: SweepResult) -> None:
        seen: set[int] = set()
        while True:
            batch = [job for job in self.jobs.due_for_expiry(now) if job.id not in seen]
            if not batch:  # none left (or only jobs that could not be expired this time)
                return
            for job in batch:
                seen.add(job.id)
                try:
                    deleted = self._delete_outputs(job.outputs or [])
                    result.objects_deleted += self._delete_shared_outputs(job.outputs or [])
                except OSError:
                    log.exception("retention: could not delete the files of job %s; will retry", job.id)
                    continue
                self.jobs.mark_expired(job.id)  # only after the files are gone
                result.files_deleted += deleted
                result.jobs_expired += 1
                if self.on_deleted is not None:
                    try:
                        self.on_deleted(job.id)
                    except Exception:
                        log.exception("retention: on_deleted(%s) failed", job.id)

    def _delete_outputs(self, names: list) -> int:
        deleted = 0
        for name in names:
            path = self.outputs.path_for(name) if isinstance(name, str) else None
            if path is None:  # not a name we could have made: never touch anything for it
                log.warning("retention: skipping unsafe output name %r", name)
                continue
            deleted += _remove(path)
        return deleted

    def _delete_shared_outputs(self, names: list) -> int:
        """The bucket's copies (raises OSError if the store refused or was away: retried next time)."""
        if self.shared is None:
            return 0
        safe = [name for name in names if isinstance(name, str) and self.outputs.path_for(name) is not None]
        for name in safe:
            self.shared.outputs.remove(name)
        return len(safe)

    def _sweep_inputs(self, cutoff: float, result: SweepResult) -> None:
        # read the references before looking at the files: an input referenced by a job created
        # after this point was (re)stored or touched just now, so it is newer than the cutoff
        needed = self.jobs.active_inputs()
        result.inputs_deleted += self._sweep_folder(
            self.inputs.root, cutoff,
            lambda name: name not in needed and self.inputs.path_for(name) is not None,
        )
        if self.shared is not None:
            result.objects_deleted += self._sweep_shared_inputs(self.shared, cutoff, needed)

    def _sweep_shared_inputs(self, shared: SharedImages, cutoff: float, needed: set[str]) -> int:
        deleted = 0
        try:
            stale = [name for name, modified in shared.inputs.listing()
                     if modified.timestamp() < cutoff and name not in needed and self.inputs.path_for(name) is not None]
            for name in stale:
                shared.inputs.remove(name)
                deleted += 1
        except Exception:  # noqa: BLE001 - the bucket away: next sweep
            log.warning("retention: sweeping the bucket's inputs failed; will retry", exc_info=True)
        return deleted

    @staticmethod
    def _sweep_folder(root: Path, cutoff: float, wanted: Callable[[str], bool]) -> int:
        """Delete regular files directly in ``root`` whose name is ``wanted`` and whose mtime is
        before ``cutoff`` (symlinks and folders are left alone)."""
        deleted = 0
        try:
            entries = list(os.scandir(root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if not wanted(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                os.unlink(entry.path)
                deleted += 1
            except FileNotFoundError:
                continue
            except OSError:
                log.exception("retention: could not delete %s", entry.path)
        return deleted

    # -- background thread ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="fluxserve-janitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.sweep()
            except Exception as exc:  # a bad sweep (database down, disk error) must not end the thread
                dependency = transient_dependency(exc)
                if dependency is None:
                    log.exception("retention: sweep failed")
                else:  # an outage: one line, not a traceback per sweep
                    log.debug("retention: sweep skipped: %s unavailable (%s)", dependency.value, exc)
            stop.wait(max(0.0, self.interval_seconds - (time.monotonic() - started)))
