"""The image's HEALTHCHECK: healthy when this container's fluxserve answers ``GET /health`` with 200.

One image runs every role, so this asks the API port first (``FLUXSERVE_PORT``, default 8000:
``serve`` and ``serve --no-worker``) and, when nothing listens there, the worker's small port
(``FLUXSERVE_WORKER_PORT``, default 9100: ``worker``). An answer other than 200 (``degraded``,
503) is unhealthy; so is a container where neither port answers. Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 4.0


def probe(port: int, host: str = "127.0.0.1") -> bool | None:
    """True: 200; False: answered otherwise; None: nothing listens on ``port``."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=TIMEOUT_SECONDS) as answer:
            return answer.status == 200
    except urllib.error.HTTPError:
        return False
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            return None
        return False


def main(environ: dict[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    ports = (int(env.get("FLUXSERVE_PORT") or 8000), int(env.get("FLUXSERVE_WORKER_PORT") or 9100))
    for port in ports:
        result = probe(port)
        if result is not None:
            print(f"port {port}: {'healthy' if result else 'unhealthy'}")
            return 0 if result else 1
    print(f"nothing answers on ports {ports[0]} (API) or {ports[1]} (worker)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
