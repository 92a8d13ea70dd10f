"""Secrets at rest (the S3 secret keys users hand to update_s3), encrypted with a server secret.

The Fernet key is derived from the server secret with HKDF-SHA256 (no salt, info
``b"fluxserve secretbox v1"``), so any string works as a server secret and the same secret
always opens what it sealed. Fernet authenticates its tokens: a wrong server secret or a token
changed by a single byte fails to decrypt rather than yielding garbage.

The server secret is ``FLUXSERVE_SECRET_KEY`` when set, else ``data_dir/secret.key``, created on
first start (32 random bytes, urlsafe base64, mode 0600). Losing it makes the stored S3 secrets
unreadable: users would have to call update_s3 again.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger(__name__)

SECRET_FILE_NAME = "secret.key"
_HKDF_INFO = b"fluxserve secretbox v1"


class SecretBoxError(Exception):
    """A token that this server secret cannot open. The message never holds key material."""


class SecretBox:
    def __init__(self, server_secret: str):
        if not isinstance(server_secret, str) or not server_secret:
            raise ValueError("server secret must be a non-empty string")
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
            server_secret.encode("utf-8")
        )
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def __repr__(self) -> str:  # never the key
        return "SecretBox(<hidden>)"

    def encrypt(self, plaintext: str) -> str:
        if not isinstance(plaintext, str):
            raise TypeError("plaintext must be a str")
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        if not isinstance(token, str):
            raise SecretBoxError("cannot decrypt: the stored value is not a token")
        try:
            data = self._fernet.decrypt(token.encode("utf-8"))
        except (InvalidToken, ValueError, TypeError):
            raise SecretBoxError(
                "cannot decrypt a stored secret: the token was altered or the server secret "
                "(FLUXSERVE_SECRET_KEY / secret.key) has changed"
            ) from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretBoxError("cannot decrypt a stored secret: it is not text") from None


def load_or_create_server_secret(data_dir: Path, configured: str | None) -> str:
    """The configured secret if set (blank counts as unset), else ``data_dir/secret.key``,
    created atomically on first use. The value is never logged."""
    if configured is not None and configured.strip():
        return configured.strip()
    data_dir = Path(data_dir)
    path = data_dir / SECRET_FILE_NAME
    existing = _read_secret_file(path)
    if existing is not None:
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)  # 32 random bytes, urlsafe base64
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".secret.key.")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # link() never replaces: if another process created the file first, its secret wins
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # file systems without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _fsync_dir(data_dir)
    value_on_disk = _read_secret_file(path)
    if value_on_disk is None:  # pragma: no cover - removed between create and read
        raise RuntimeError(f"could not create {path}")
    if value_on_disk == value:
        log.info("created a new server secret in %s (keep it: it decrypts stored S3 secrets)", path)
    return value_on_disk


def _read_secret_file(path: Path) -> str | None:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    value = raw.strip()
    if not value:
        raise ValueError(f"{path} is empty: restore it, or set FLUXSERVE_SECRET_KEY")
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is accessible to other users; restrict it with chmod 600", path)
    except OSError:  # pragma: no cover
        pass
    return value


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
