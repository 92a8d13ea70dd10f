"""Files on local disk, served over HTTP by the API under ``/outputs/`` (a ``Storage``)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


class LocalStorage:
    route = "/outputs"

    def __init__(self, root: Path, base_url: str):
        self.root = Path(root)
        self.base_url = base_url.rstrip("/")
        self.root.mkdir(parents=True, exist_ok=True)

    def url_for(self, name: str) -> str:
        return f"{self.base_url}{self.route}/{name}"

    def path_for(self, name: str) -> Path | None:
        """The file for a public name, or None if the name is not one we could have made."""
        if not _SAFE_NAME.match(name) or ".." in name:
            return None
        return self.root / name

    def save(self, name: str, data: bytes, content_type: str = "image/png") -> str:
        """Write atomically: a reader never sees half a file, a crash leaves no partial one.
        Returns the file's URL."""
        target = self.path_for(name)
        if target is None:
            raise ValueError(f"unsafe output name {name!r}")
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.url_for(name)

    def read(self, name: str) -> bytes:
        path = self.path_for(name)
        if path is None:
            raise FileNotFoundError(name)
        return path.read_bytes()

    #: what ``check`` writes: about one output's worth, so a nearly full disk fails the probe too
    PROBE_BYTES = 1024 * 1024

    def check(self) -> None:
        """The folder takes a write of about one output (raises OSError, e.g. ENOSPC, if not)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-probe-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(bytes(self.PROBE_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            Path(tmp).unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        path = self.path_for(name)
        if path is not None:
            path.unlink(missing_ok=True)
