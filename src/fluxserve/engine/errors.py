"""The engine's errors, importable without torch (the worker handles them without the engine)."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model that could not be loaded; the message says why and what to do."""


class JobAborted(RuntimeError):
    """Raised from the step callback to stop a generation whose job is no longer ours."""
