"""An init image that is one of this server's own outputs (a URL under
``<FLUXSERVE_PUBLIC_BASE_URL>/outputs/``, as ``output`` hands them out) is read from local
storage: no HTTP round trip to ourselves, and no exception to the fetch policy (which refuses
loopback and private addresses, where this server usually lives). Editing what was just
generated thus works offline and with the default policy."""

from __future__ import annotations

from pathlib import Path

from fluxserve.fetching import FetchError, decode_data_uri, decode_raw_base64
from fluxserve.images import ImageInputError
from fluxserve.storage.local import LocalStorage

_PREFIX = "Unable to fetch image from provided URL: "


def own_output_path(storage: LocalStorage, url: str) -> Path | None:
    """The file behind ``url`` when it is one of ``storage``'s URLs (whether or not the file is
    there); None for any other URL. Raises ImageInputError for a name we could never have made."""
    prefix = storage.url_for("")
    if not url.startswith(prefix):
        return None
    path = storage.path_for(url[len(prefix):])
    if path is None:
        raise ImageInputError(f"{_PREFIX}not an output of this server")
    return path


def read_own_output(storage: LocalStorage, url: str, max_bytes: int) -> bytes | None:
    """The bytes of the image at ``url`` if it is one of this server's outputs (a ``.base64``
    output decoded), else None (fetch it). Blocking: call it in a thread."""
    path = own_output_path(storage, url)
    if path is None:
        return None
    try:
        size = path.stat().st_size
        if size > max_bytes * 2:  # base64 is 4/3 of its bytes; checked exactly below
            raise ImageInputError(f"Init image too large: larger than {max_bytes} bytes")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageInputError(
            f"{_PREFIX}no such output on this server (outputs expire: FLUXSERVE_RETENTION_SECONDS)") from None
    if path.suffix == ".base64":
        text = data.decode("ascii", errors="replace").strip()
        try:
            data = decode_data_uri(text, max_bytes) if text[:5].lower() == "data:" else decode_raw_base64(text, max_bytes)
        except FetchError as exc:
            raise ImageInputError(f"{_PREFIX}{exc}") from None
    if len(data) > max_bytes:
        raise ImageInputError(f"Init image too large: larger than {max_bytes} bytes")
    return data
