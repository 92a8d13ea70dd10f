"""Webhook delivery: signed, at-least-once, persisted.

The job store writes a ``WebhookDelivery`` row (status ``pending``) in the same transaction
that finishes a job. The ``WebhookDispatcher`` here POSTs due rows and records the outcome
in the row, so the retry schedule lives in the database (``next_attempt_at``) and pending
deliveries survive a restart.

Every POST carries::

    Content-Type: application/json
    User-Agent: fluxserve-webhooks/<version>
    X-Fluxserve-Timestamp: <unix seconds>
    X-Fluxserve-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}." + body)>
    X-Fluxserve-Delivery: <delivery id>
    Idempotency-Key: fluxserve-job-<job id>-<delivery id>     (the same on every retry)

The body is ``json.dumps(payload, separators=(",", ":"), sort_keys=True)`` encoded as UTF-8,
and the signature is over exactly those bytes; the secret is the API key's webhook secret.

Outcomes: 2xx -> delivered. Timeouts, connection errors, 408, 429 and 5xx -> retried with
exponential backoff and full jitter (a larger ``Retry-After`` on 429/503 wins) until the
row's ``give_up_at``, then failed. Redirects (not followed) and other 4xx -> failed at once.

Two dispatchers on one database (two server processes) never POST the same delivery at the
same time: a dispatcher claims a row with a guarded UPDATE that bumps ``attempts`` and moves
``next_attempt_at`` forward by a lease; only the claim whose guard still matched may send,
and only the holder of the current claim may record the outcome. A dispatcher that dies
mid-POST leaves the row pending; it is retried once the lease runs out (at-least-once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from fluxserve import __version__
from fluxserve.dependencies import transient_dependency
from fluxserve.fetching import FetchError, FetchPolicy, Resolver, UrlRefused, check_webhook_url, pinned
from fluxserve.jobs.database import rowcount
from fluxserve.jobs.status import DeliveryStatus
from fluxserve.jobs.tables import WebhookDelivery, utcnow
from fluxserve.keys import KeyStore

log = logging.getLogger(__name__)

USER_AGENT = f"fluxserve-webhooks/{__version__}"
TIMESTAMP_HEADER = "X-Fluxserve-Timestamp"
SIGNATURE_HEADER = "X-Fluxserve-Signature"
DELIVERY_HEADER = "X-Fluxserve-Delivery"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_SCHEME = "sha256="

DELIVERED, RETRY, FAILED = "delivered", "retry", "failed"  # what on_result receives
RETRYABLE_STATUS = frozenset({408, 429})  # plus every 5xx
RETRY_AFTER_STATUS = frozenset({429, 503})
MAX_ERROR_CHARS = 300


# -- signing -------------------------------------------------------------------------------------
def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp}.".encode() + body`` under ``secret``."""
    message = f"{int(timestamp)}.".encode() + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def verify(
    secret: str, timestamp: int | str, body: bytes, signature: str,
    tolerance_seconds: float = 300, now: float | None = None,
) -> bool:
    """What a receiver does: True when ``signature`` (``sha256=<hex>`` or bare hex, as sent in
    X-Fluxserve-Signature) matches ``body`` and ``timestamp`` (X-Fluxserve-Timestamp) is within
    ``tolerance_seconds`` of ``now`` (unix seconds; default: the clock). Constant-time compare."""
    try:
        stamp = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - stamp) > tolerance_seconds:
        return False
    if not isinstance(signature, str):
        return False
    given = signature.strip()
    if given.startswith(SIGNATURE_SCHEME):
        given = given[len(SIGNATURE_SCHEME):]
    expected = sign(secret, stamp, body)
    return hmac.compare_digest(expected.encode("ascii"), given.lower().encode("ascii", "replace"))


def serialize(payload: Any) -> bytes:
    """The exact body bytes that are POSTed (and signed)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")


def idempotency_key(job_id: int, delivery_id: int) -> str:
    return f"fluxserve-job-{job_id}-{delivery_id}"


def build_headers(secret: str, timestamp: int, body: bytes, *, job_id: int, delivery_id: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        TIMESTAMP_HEADER: str(int(timestamp)),
        SIGNATURE_HEADER: SIGNATURE_SCHEME + sign(secret, timestamp, body),
        DELIVERY_HEADER: str(delivery_id),
        IDEMPOTENCY_HEADER: idempotency_key(job_id, delivery_id),
    }


# -- scheduling ----------------------------------------------------------------------------------
def backoff_seconds(
    attempts: int, *, base: float = 1.0, cap: float = 300.0, rng: Callable[[float, float], float] = random.uniform,
) -> float:
    """Exponential backoff with full jitter ("AWS style"): uniform in [0, min(cap, base * 2**(n-1))]
    after ``n`` failed attempts, floored at ``base`` so a retry never comes back immediately."""
    exponent = max(0, attempts - 1)
    ceiling = cap if exponent >= 64 else min(cap, base * (2.0 ** exponent))
    return max(min(base, cap), rng(0.0, ceiling))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - now).total_seconds()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class _Result:
    outcome: str  # delivered | retry | failed
    error: str | None = None
    retry_after: float | None = None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _host(url: str) -> str:
    """Only the host is logged: a webhook URL's path or query may carry the receiver's token."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


# -- the dispatcher ------------------------------------------------------------------------------
class WebhookDispatcher:
    """Delivers pending ``WebhookDelivery`` rows; see the module docstring."""

    def __init__(
        self, sessions: sessionmaker[Session], *, timeout_seconds: float = 10.0, poll_seconds: float = 0.5,
        max_backoff_seconds: float = 300.0, base_backoff_seconds: float = 1.0,
        on_result: Callable[[str], None] | None = None,
        batch_size: int = 50, lease_seconds: float | None = None, fetch_policy: FetchPolicy | None = None,
        resolver: Resolver | None = None,
    ):
        self._sessions = sessions
        # webhook URLs come from strangers: checked (no private/loopback/metadata targets unless
        # allowlisted) and the connection pinned to the checked address, before every POST
        self._policy = fetch_policy or FetchPolicy()
        self._resolver = resolver
        self._keys = KeyStore(sessions)
        self.timeout_seconds = float(timeout_seconds)
        self.poll_seconds = float(poll_seconds)
        self.max_backoff_seconds = float(max_backoff_seconds)
        self.base_backoff_seconds = float(base_backoff_seconds)
        self.batch_size = int(batch_size)
        # httpx's timeout bounds each phase (connect, write, each read), so one POST can take
        # a few multiples of it; the claim must outlast that, or another dispatcher re-sends.
        self.lease_seconds = float(lease_seconds) if lease_seconds is not None else 3 * self.timeout_seconds + 30.0
        self._on_result = on_result
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout_seconds),
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),  # no stale pooled connections
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- background loop -------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()  # a fresh one: a late old loop keeps seeing its own set
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="fluxserve-webhooks", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop (after the POST in flight, if any) and wait for it, at most ``timeout``
        (default: the POST timeout + 5 s). A POST cut short by the process exiting leaves its
        row pending; it is sent again once its lease runs out."""
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self.timeout_seconds + 5.0 if timeout is None else timeout)

    def close(self) -> None:
        self.stop()
        self._client.close()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._pass(None, stop=stop)
            except Exception as exc:  # never die: the database may be briefly unreachable
                if transient_dependency(exc) is None:
                    log.exception("webhook dispatcher pass failed; retrying in %.1fs", self.poll_seconds)
                else:  # an outage: the worker and the API log it once; no traceback per pass
                    log.debug("webhook dispatcher pass skipped: %s", exc)
            stop.wait(self.poll_seconds)

    # -- one pass --------------------------------------------------------------------------------
    def deliver_due(self, now: datetime | None = None) -> int:
        """POST every due pending delivery (oldest first, at most ``batch_size``) that this
        dispatcher manages to claim. ``now`` pins the clock (tests); by default each delivery
        uses the current time. Returns how many deliveries were attempted."""
        return self._pass(now)

    def _pass(self, now: datetime | None, *, stop: threading.Event | None = None) -> int:
        pass_now = now or utcnow()
        with self._sessions() as session:
            due = session.execute(
                select(WebhookDelivery.id, WebhookDelivery.attempts)
                .where(
                    WebhookDelivery.status == DeliveryStatus.PENDING.value,
                    WebhookDelivery.next_attempt_at <= pass_now,
                )
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(self.batch_size)
            ).all()
        attempted = 0
        for delivery_id, seen_attempts in due:
            if stop is not None and stop.is_set():
                break  # stop() waits only for the POST in flight
            if self._attempt(delivery_id, seen_attempts, now):
                attempted += 1
        return attempted

    def _claim(self, delivery_id: int, seen_attempts: int, now: datetime) -> WebhookDelivery | None:
        """Guarded UPDATE: only one dispatcher can move a row from (due, n attempts) to
        (leased, n+1 attempts). Returns the claimed row, or None if another one got it."""
        with self._sessions.begin() as session:
            claimed = rowcount(session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery_id,
                    WebhookDelivery.status == DeliveryStatus.PENDING.value,
                    WebhookDelivery.attempts == seen_attempts,
                    WebhookDelivery.next_attempt_at <= now,
                )
                .values(
                    attempts=seen_attempts + 1,
                    next_attempt_at=now + timedelta(seconds=self.lease_seconds),
                )
                .execution_options(synchronize_session=False)
            ))
        if not claimed:
            return None
        with self._sessions() as session:
            return session.get(WebhookDelivery, delivery_id)

    def _attempt(self, delivery_id: int, seen_attempts: int, now: datetime | None) -> bool:
        row = self._claim(delivery_id, seen_attempts, now or utcnow())
        if row is None:
            return False
        attempt = seen_attempts + 1
        try:
            secret = self._keys.webhook_secret(row.key_id)
            result = self._post(row, secret)
        except Exception as exc:  # a bug or the database: keep the delivery, retry later
            log.exception("webhook delivery %s (job %s): internal error", row.id, row.job_id)
            result = _Result(RETRY, f"internal error: {type(exc).__name__}")
        self._record(row, attempt, result, now or utcnow())
        return True

    def _post(self, row: WebhookDelivery, secret: str) -> _Result:
        body = serialize(row.payload)  # serialized once: the signature covers exactly these bytes
        headers = build_headers(secret, int(time.time()), body, job_id=row.job_id, delivery_id=row.id)
        try:
            target = check_webhook_url(row.url, self._policy, self._resolver)
        except UrlRefused as exc:
            return _Result(FAILED, _short(f"webhook URL refused: {exc}"))
        except FetchError as exc:  # e.g. the name does not resolve right now
            return _Result(RETRY, _short(f"webhook URL: {exc}"))
        url, pin_headers, extensions = pinned(target, row.url)
        try:
            with self._client.stream("POST", url, content=body, headers={**headers, **pin_headers},
                                     extensions=extensions) as response:
                status = response.status_code  # the body is never read: only the status matters
                retry_after = response.headers.get("retry-after")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            return _Result(FAILED, _short(f"invalid webhook URL: {type(exc).__name__}"))
        except httpx.TimeoutException as exc:
            return _Result(RETRY, f"timeout after {self.timeout_seconds:g}s ({type(exc).__name__})")
        except httpx.TransportError as exc:
            return _Result(RETRY, _short(f"connection error: {type(exc).__name__}: {exc}"))
        if 200 <= status < 300:
            return _Result(DELIVERED)
        if status >= 500 or status in RETRYABLE_STATUS:
            wait = parse_retry_after(retry_after, utcnow()) if status in RETRY_AFTER_STATUS else None
            return _Result(RETRY, f"HTTP {status}", wait)
        if 300 <= status < 400:
            return _Result(FAILED, f"HTTP {status}: redirects are not followed; the webhook URL must answer 2xx itself")
        return _Result(FAILED, f"HTTP {status}: the receiver refused the webhook (not retried)")

    def _record(self, row: WebhookDelivery, attempt: int, result: _Result, at: datetime) -> None:
        outcome, error = result.outcome, result.error
        values: dict[str, Any]
        if outcome == DELIVERED:
            values = {"status": DeliveryStatus.DELIVERED.value, "delivered_at": at}
        elif outcome == RETRY:
            delay = backoff_seconds(attempt, base=self.base_backoff_seconds, cap=self.max_backoff_seconds)
            if result.retry_after is not None:
                delay = max(delay, result.retry_after)
            next_at = at + timedelta(seconds=delay)
            if next_at > row.give_up_at:
                outcome = FAILED
                error = _short(f"{error}; gave up after {attempt} attempt(s): retry period over")
                values = {"status": DeliveryStatus.FAILED.value, "last_error": error, "next_attempt_at": at}
            else:
                values = {"last_error": error, "next_attempt_at": next_at}
        else:
            values = {"status": DeliveryStatus.FAILED.value, "last_error": error, "next_attempt_at": at}
        with self._sessions.begin() as session:
            kept = rowcount(session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == row.id,
                    WebhookDelivery.status == DeliveryStatus.PENDING.value,
                    WebhookDelivery.attempts == attempt,  # still our claim
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            ))
        if not kept:
            log.warning("webhook delivery %s (job %s): claim expired before the outcome (%s) was recorded",
                        row.id, row.job_id, outcome)
        elif outcome == DELIVERED:
            log.info("webhook delivery %s (job %s) to %s delivered (attempt %d)", row.id, row.job_id,
                     _host(row.url), attempt)
        elif outcome == RETRY:
            log.info("webhook delivery %s (job %s) to %s: %s; retry at %s (attempt %d)", row.id, row.job_id,
                     _host(row.url), error, values["next_attempt_at"].isoformat(), attempt)
        else:
            log.warning("webhook delivery %s (job %s) to %s failed: %s", row.id, row.job_id, _host(row.url), error)
        if self._on_result is not None:
            try:
                self._on_result(outcome)
            except Exception:
                log.exception("webhook on_result callback failed")
