"""SecretBox: S3 secrets encrypted at rest with a server secret; the server secret's file."""

from __future__ import annotations

import base64
import logging
import stat
import threading

import pytest

from fluxserve.secretbox import SecretBox, SecretBoxError, load_or_create_server_secret

PLAINTEXT = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

# Made once with SecretBox("pinned server secret"): the key derivation must never change,
# or every stored secret becomes unreadable after an upgrade.
PINNED_TOKEN = (
    "gAAAAABrAtbdQKG5kgBP442KnWLEjuR3j0r6PcJMMhvXcTIALzsTocwfX_oWLpyI520TBa1CEDSeOIsL3iUAzPKsUHUku3f438t_"
    "UxwOLi0thX6G8xU0eWs="
)


def test_round_trip_and_ciphertext_hides_plaintext():
    box = SecretBox("server secret one")
    token = box.encrypt(PLAINTEXT)
    assert isinstance(token, str)
    assert PLAINTEXT not in token
    assert "server secret one" not in token
    for fragment in ("wJalrXUtnFEMI", "EXAMPLEKEY"):
        assert fragment not in token
        assert base64.urlsafe_b64encode(fragment.encode()).decode()[:8] not in token
    assert box.decrypt(token) == PLAINTEXT
    assert SecretBox("server secret one").decrypt(token) == PLAINTEXT  # a new instance, same secret
    assert box.encrypt(PLAINTEXT) != token  # random IV: equal secrets don't look equal


def test_unicode_and_empty_plaintext():
    box = SecretBox("s")
    for text in ("", "päss wörd ✓", "x" * 5000):
        assert box.decrypt(box.encrypt(text)) == text


def test_pinned_token_still_decrypts():
    assert SecretBox("pinned server secret").decrypt(PINNED_TOKEN) == "pinned plaintext"


def test_other_server_secret_cannot_decrypt():
    token = SecretBox("server secret one").encrypt(PLAINTEXT)
    with pytest.raises(SecretBoxError) as caught:
        SecretBox("server secret two").decrypt(token)
    message = str(caught.value)
    assert "server secret" in message  # says what to look at
    assert PLAINTEXT not in message and "server secret two" not in message and token not in message


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-6] + ("A" if t[-6] != "A" else "B") + t[-5:],  # one character changed
        lambda t: t[:20] + t[21:],  # one dropped
        lambda t: t[:-10],  # truncated
        lambda t: "not a token at all",
        lambda t: "",
        lambda t: "ünïcode",
    ],
)
def test_tampered_or_garbage_token(mangle):
    box = SecretBox("k")
    token = box.encrypt(PLAINTEXT)
    with pytest.raises(SecretBoxError):
        box.decrypt(mangle(token))


def test_non_string_token_and_empty_secret():
    with pytest.raises(SecretBoxError):
        SecretBox("k").decrypt(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SecretBox("")
    assert "k" not in repr(SecretBox("k")).replace("SecretBox", "")


def test_configured_secret_wins_and_no_file_is_written(tmp_path):
    assert load_or_create_server_secret(tmp_path, "from-env") == "from-env"
    assert load_or_create_server_secret(tmp_path, "  padded\n") == "padded"
    assert not (tmp_path / "secret.key").exists()


@pytest.mark.parametrize("configured", [None, "", "   "])
def test_created_once_with_mode_0600(tmp_path, configured, caplog):
    data_dir = tmp_path / "nested" / "data"  # created if missing
    with caplog.at_level(logging.DEBUG):
        secret = load_or_create_server_secret(data_dir, configured)
    path = data_dir / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == secret
    assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) == 32
    assert secret not in caplog.text  # never logged
    assert load_or_create_server_secret(data_dir, configured) == secret  # read back, not remade
    assert [p.name for p in data_dir.iterdir()] == ["secret.key"]  # no temp files left


def test_existing_file_is_used(tmp_path):
    (tmp_path / "secret.key").write_text("an existing secret\n")
    (tmp_path / "secret.key").chmod(0o600)
    assert load_or_create_server_secret(tmp_path, None) == "an existing secret"


def test_empty_file_is_an_error_not_silently_replaced(tmp_path):
    (tmp_path / "secret.key").write_text("\n")
    with pytest.raises(ValueError, match="FLUXSERVE_SECRET_KEY"):
        load_or_create_server_secret(tmp_path, None)


def test_concurrent_first_starts_agree(tmp_path):
    results: list[str] = []
    barrier = threading.Barrier(8)

    def start():
        barrier.wait()
        results.append(load_or_create_server_secret(tmp_path, None))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert (tmp_path / "secret.key").read_text().strip() == results[0]
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]


def test_box_from_loaded_secret(tmp_path):
    box = SecretBox(load_or_create_server_secret(tmp_path, None))
    token = box.encrypt(PLAINTEXT)
    again = SecretBox(load_or_create_server_secret(tmp_path, None))  # "after a restart"
    assert again.decrypt(token) == PLAINTEXT
