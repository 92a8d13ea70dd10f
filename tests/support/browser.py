"""Headless Chromium for the browser tests: Debian's ``chromium`` driven by Playwright (its Python
package only: ``playwright install`` is never run, no browser is downloaded). Skipped with the
reason when no chromium binary or no playwright is found, unless FLUXSERVE_REQUIRE_BROWSER=1 (CI),
which makes that a failure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

REQUIRE_ENV = "FLUXSERVE_REQUIRE_BROWSER"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# as the workplace's notes say Chromium runs here: no sandbox as root, no GPU, and none of the
# background traffic to Google's hosts (which this machine's closed network refuses)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
    # a second fence beside the tests' request routing: no name but loopback resolves
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]


def browser_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def find_chromium() -> str | None:
    """FLUXSERVE_CHROMIUM, else Debian's /usr/bin/chromium, else one on PATH."""
    for candidate in (os.environ.get("FLUXSERVE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def is_loopback(url: str) -> bool:
    """Whether a request stays on this machine (data: and blob: URLs never leave the page)."""
    if url.startswith(("data:", "blob:", "about:")):
        return True
    return (urlsplit(url).hostname or "") in LOOPBACK
