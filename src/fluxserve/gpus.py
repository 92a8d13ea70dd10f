"""Which GPUs a server runs its workers on (``FLUXSERVE_GPUS``), found without importing torch:
the process that hosts the workers never initialises CUDA itself, each worker process does, for
the one GPU it is given through ``CUDA_VISIBLE_DEVICES``.

``all`` is every GPU this process may see: the entries of ``CUDA_VISIBLE_DEVICES`` when it is
set (a container runtime or Kubernetes' device plugin usually sets it), else the GPUs that
``nvidia-smi -L`` lists; with neither (a CPU machine, a test), one worker with no GPU of its own.
A list (``0,2``) is taken as given: the indices (or UUIDs) as CUDA_VISIBLE_DEVICES names them."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)
_ENTRY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_:.-]{0,63}")  # an index, or a GPU-/MIG- UUID
NVIDIA_SMI_TIMEOUT_SECONDS = 10.0


def parse_gpus(value: str) -> list[str] | None:
    """``all`` -> None (detect); ``0,2`` -> ["0", "2"]. Raises ValueError for anything else."""
    text = value.strip().lower()
    if text in ("", "all"):
        return None
    entries = [entry.strip() for entry in value.split(",")]
    bad = [entry for entry in entries if not _ENTRY.fullmatch(entry)]
    if bad or not entries:
        raise ValueError(f"not a GPU list: {value!r}; use all, or indices such as 0,2")
    if len(set(entries)) != len(entries):
        raise ValueError(f"GPU listed twice in {value!r}")
    return entries


def _nvidia_smi() -> list[str]:
    """The indices of the GPUs nvidia-smi lists; [] when it is missing or fails."""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,  # noqa: S607 - on PATH by design
                              timeout=NVIDIA_SMI_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    return [str(index) for index, line in enumerate(line for line in done.stdout.splitlines() if line.startswith("GPU "))]


def worker_gpus(value: str, environ: Mapping[str, str] | None = None,
                list_gpus: Callable[[], Sequence[str]] = _nvidia_smi) -> list[str | None]:
    """One entry per worker process to start: the CUDA_VISIBLE_DEVICES value it gets, or None
    (no GPU found: one worker that inherits this process's environment)."""
    chosen = parse_gpus(value)
    if chosen is not None:
        return list(chosen)
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
        # "-1" or "" hides every GPU: one worker, on what remains (the CPU)
        if entries and entries != ["-1"]:
            return list(entries)
        return [None]
    found: list[str | None] = list(list_gpus())
    return found or [None]
