"""The engine's errors, importable without torch (the worker handles them without the engine)."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model that could not be loaded; the message says why and what to do."""


class JobAborted(RuntimeError):
    """Raised from the step callback to stop a generation whose job is no longer ours."""


class JobInterrupted(RuntimeError):
    """Raised from the step callback when the worker is stopping and its grace period has run
    out: the job goes back to the queue (it is not the job's failure)."""
