"""API keys: random tokens, stored only as SHA-256 digests (the tokens carry 256 bits of
entropy, so a fast digest is safe), looked up by digest and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fluxserve.jobs.tables import ApiKey, utcnow

KEY_PREFIX = "fs_"
WEBHOOK_SECRET_PREFIX = "whsec_"
SHOWN_CHARS = 10  # the part of a key stored in clear and listed (``fs_`` + 7 characters)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    def create(self, name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
        """Return the new row and the plaintext key (shown once, never stored)."""
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(
            name=name, key_hash=hash_key(plaintext), prefix=plaintext[:SHOWN_CHARS], is_admin=admin,
            webhook_secret=WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32),
        )
        with self._sessions.begin() as session:
            session.add(row)
        return row, plaintext

    def authenticate(self, plaintext: str | None) -> ApiKey | None:
        if not plaintext or not isinstance(plaintext, str) or len(plaintext) > 200:
            return None
        try:
            digest = hash_key(plaintext)
        except UnicodeEncodeError:  # a lone surrogate cannot be any key of ours
            return None
        with self._sessions() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
        if row is None or row.revoked_at is not None:
            return None
        return row if hmac.compare_digest(row.key_hash, digest) else None

    def get(self, key_id: int) -> ApiKey | None:
        with self._sessions() as session:
            return session.get(ApiKey, key_id)

    def webhook_secret(self, key_id: int) -> str:
        """The key's webhook signing secret (created for keys made before webhooks existed)."""
        with self._sessions.begin() as session:
            row = session.get(ApiKey, key_id)
            assert row is not None, f"no key {key_id}"  # callers pass an existing key (the CLI checks; deliveries have a FK)
            if row.webhook_secret is None:
                row.webhook_secret = WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)
            return row.webhook_secret

    def list(self) -> list[ApiKey]:
        with self._sessions() as session:
            return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))

    def revoke(self, ident: str) -> ApiKey | None:
        """Revoke by numeric id, by the prefix as ``keys list`` prints it (``fs_ab12cd3…``; the
        ellipsis, or ``...``, may be left on) or by the whole key; None if nothing matched."""
        ident = ident.strip()
        shown = ident.removesuffix("\u2026").removesuffix("...")
        with self._sessions.begin() as session:
            query = select(ApiKey)
            if ident.isascii() and ident.isdigit():
                query = query.where(ApiKey.id == int(ident))
            elif ident.startswith(KEY_PREFIX) and len(ident) > SHOWN_CHARS and shown == ident:
                query = query.where(ApiKey.key_hash == hash_key(ident))  # the whole key (longer than a prefix)
            else:
                query = query.where(ApiKey.prefix == shown)
            row = session.scalar(query)
            if row is not None and row.revoked_at is None:
                row.revoked_at = utcnow()
        return row
