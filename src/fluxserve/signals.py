"""Acting on SIGTERM and SIGINT safely. Python runs a signal handler in the main thread between
two bytecodes, possibly while that thread holds a lock (a queue's, the job events', the
database pool's): doing the work in the handler could deadlock on it. So a handler only sets an
event, and the work runs on a thread of its own that was waiting for it (``OnSignal``)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCE_SECONDS = 3.0  # what a second signal leaves for putting jobs back before the process exits
log = logging.getLogger(__name__)


class OnSignal:
    """Runs ``action`` once, on its own (daemon) thread, when ``fire()`` is called: ``fire`` only
    sets an event, so a signal handler may call it. ``done`` is set once the action is over."""

    def __init__(self, name: str, action: Callable[[], object]):
        self._action = action
        self._fired = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def fire(self) -> None:
        self._fired.set()

    def _run(self) -> None:
        self._fired.wait()
        try:
            self._action()
        except Exception:  # noqa: BLE001 - logged; whoever waits on done goes on
            log.exception("%s failed", self._thread.name)
        finally:
            self.done.set()


def exit_now(code: int, release: OnSignal, seconds: float = FORCE_SECONDS) -> NoReturn:
    """A second signal: run ``release`` (e.g. put the running jobs back in the queue) for at most
    ``seconds``, then end the process at once (no cleanup, no waiting for anything else)."""
    release.fire()
    release.done.wait(seconds)
    _release_semaphores()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - exiting anyway
            pass
    os._exit(code)


def _release_semaphores() -> None:
    """Unlink the named semaphores this process made through multiprocessing (the worker's
    queues and events) before ``os._exit``, which skips the finalizers that would: else the
    resource tracker unlinks them itself at exit and warns of "leaked semaphore objects".
    These finalizers (exit priority >= 0: semaphores, queue closing) are what a normal exit runs
    first; the ones that join threads or processes (negative priority) are left out."""
    try:
        from multiprocessing import util

        util._run_finalizers(0)  # type: ignore[attr-defined]  # private, stable since Python 2.6
    except Exception:  # noqa: BLE001 - exiting anyway; the tracker still cleans up
        log.debug("releasing semaphores failed", exc_info=True)
