"""Running the app under uvicorn with fluxserve's stop.

uvicorn's own SIGTERM/SIGINT handling is kept (stop accepting connections, drain the open ones,
run the app's shutdown), with three changes: the first signal also starts the worker's stop at
once (``ServerLifecycle.begin_stop``: no job is claimed after it, and waiting requests and
progress streams end, so the drain is short); a second signal puts the running jobs back in the
queue and exits at once; and a graceful stop exits with status 0 (uvicorn raises the signal
again after its shutdown, which makes the exit status say "killed")."""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from fluxserve.config import Settings
from fluxserve.runtime import ServerLifecycle
from fluxserve.signals import STOP_SIGNALS, OnSignal, exit_now


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: ServerLifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.signals = 0
        # the work runs on threads waiting for it: a handler only sets an event (fluxserve.signals)
        self._begin = OnSignal("fluxserve-stop", lifecycle.begin_stop)
        self._force = OnSignal("fluxserve-force-stop", lifecycle.force_stop)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without raising the signal again at the end: a graceful stop exits 0."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:
            exit_now(128 + sig, self._force)
        self._begin.fire()
        super().handle_exit(sig, frame)  # uvicorn's graceful shutdown (and sse_starlette's hook)


def run_server(app: Any, settings: Settings, log_level: str, host: str | None = None, port: int | None = None) -> None:
    """Serve ``app`` (built by ``runtime.build_server_app``, or the worker role's small app of
    ``worker_service``, on ``host``/``port``) until a signal stops it."""
    config = uvicorn.Config(
        app, host=host or settings.host, port=port or settings.port, log_level=log_level,
        # uvicorn's loggers go to the root handler of logs.configure, in its format (JSON too),
        # instead of uvicorn's own handlers and format
        log_config=None,
        # a bound on draining connections (a slow upload, say); the worker's stop runs meanwhile
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_seconds)),
    )
    GracefulServer(config, app.state.lifecycle).run()
    # Stopped: jobs recorded or back in the queue, the worker gone. The interpreter's teardown
    # would now garbage-collect every object torch, transformers and diffusers made (10 s and
    # more on a busy CPU when the worker ran in this process): nothing there needs collecting.
    gc.freeze()
