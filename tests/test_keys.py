"""API keys: plaintext shown once, only the SHA-256 digest stored; authenticate and revoke."""

from __future__ import annotations

import hashlib

import pytest

from fluxserve.jobs.database import open_database
from fluxserve.keys import KEY_PREFIX, KeyStore, hash_key


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "keys.db"


@pytest.fixture
def sessions(db_path):
    sessions = open_database(f"sqlite:///{db_path}")
    yield sessions
    sessions.kw["bind"].dispose()


@pytest.fixture
def keys(sessions):
    return KeyStore(sessions)


def test_create_returns_plaintext_and_stores_only_its_hash(keys, sessions, db_path):
    row, plaintext = keys.create("alice", admin=True)
    assert plaintext.startswith(KEY_PREFIX) and plaintext.startswith("fs_")
    assert len(plaintext) > 40
    assert row.key_hash == hash_key(plaintext) == hashlib.sha256(plaintext.encode()).hexdigest()
    assert row.prefix == plaintext[:10] and row.is_admin is True and row.revoked_at is None
    assert row.name == "alice"

    other_row, other_plaintext = keys.create("bob")
    assert other_plaintext != plaintext and other_row.id > row.id and other_row.is_admin is False

    sessions.kw["bind"].dispose()  # closes the connections: the WAL is checkpointed into the file
    stored = b"".join(path.read_bytes() for path in db_path.parent.glob(db_path.name + "*"))
    assert hash_key(plaintext).encode() in stored  # sanity: we are looking at the right bytes
    for secret in (plaintext, other_plaintext):
        assert secret.encode() not in stored
        assert secret[10:].encode() not in stored  # not even the part after the listed prefix


def test_authenticate(keys):
    row, plaintext = keys.create("alice")
    found = keys.authenticate(plaintext)
    assert found is not None and found.id == row.id and found.name == "alice"

    assert keys.authenticate(plaintext + "x") is None
    assert keys.authenticate(plaintext[:-1]) is None
    assert keys.authenticate("fs_" + "A" * 43) is None
    assert keys.authenticate(row.key_hash) is None  # the stored digest is not a key
    assert keys.authenticate(None) is None
    assert keys.authenticate("") is None
    assert keys.authenticate(12345) is None  # type: ignore[arg-type]


def test_revoke_by_id(keys):
    alice, alice_key = keys.create("alice")
    bob, bob_key = keys.create("bob")

    revoked = keys.revoke(str(alice.id))
    assert revoked is not None and revoked.id == alice.id and revoked.revoked_at is not None
    assert keys.authenticate(alice_key) is None
    assert keys.authenticate(bob_key).id == bob.id  # the other key still works

    first_time = keys.list()[0].revoked_at  # as stored (SQLite hands datetimes back naive)
    again = keys.revoke(str(alice.id))  # revoking twice keeps the first time
    assert again.id == alice.id and again.revoked_at == first_time
    assert keys.authenticate(alice_key) is None


def test_revoke_by_prefix(keys):
    alice, alice_key = keys.create("alice")
    bob, bob_key = keys.create("bob")

    revoked = keys.revoke(alice.prefix)
    assert revoked is not None and revoked.id == alice.id
    assert keys.authenticate(alice_key) is None
    assert keys.authenticate(bob_key).id == bob.id


def test_revoke_unknown(keys):
    row, plaintext = keys.create("alice")
    assert keys.revoke(str(row.id + 100)) is None
    assert keys.revoke("fs_nothere") is None
    assert keys.authenticate(plaintext).id == row.id


def test_list(keys):
    first, _ = keys.create("a")
    second, _ = keys.create("b", admin=True)
    keys.revoke(str(first.id))
    listed = keys.list()
    assert [k.id for k in listed] == [first.id, second.id]
    assert listed[0].revoked_at is not None and listed[1].revoked_at is None
    assert [k.is_admin for k in listed] == [False, True]
