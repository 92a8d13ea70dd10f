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
exponential backoff and full jitter, per delivery (a larger ``Retry-After`` on 429/503 wins),
until the row's ``give_up_at`` (the retry window), then ``dead``: a dead letter, which admins
list and replay (``jobs.deliveries``, ``api.webhook_admin``). Redirects (not followed), other
4xx and URLs the fetch policy refuses -> ``failed`` at once (the receiver refused it).

One POST gets ``timeout_seconds`` in all, from the URL check to the answer's status line and
headers (the body is never read): httpx's timeout bounds each phase (connect, each read, each
write), so a receiver that trickles its headers a byte at a time would hold it for ever; here
every socket operation is also bounded by what is left of the POST's deadline.

Concurrency: due rows are POSTed on up to ``concurrency`` threads at once, at most
``per_host`` of them to one receiver (``scheme://host[:port]``), so a slow or dead receiver
holds only its share and other receivers' webhooks go out at once (no head-of-line
blocking). A pass claims a row only when it can start its POST at once: rows of a receiver
that is at its limit stay due (and unclaimed) for a later pass.

Two dispatchers on one database (two server processes) never POST the same delivery at the
same time: a dispatcher claims a row with a guarded UPDATE that bumps ``attempts``, sets a
fresh claim token and moves ``next_attempt_at`` forward by a lease that outlasts the POST's
deadline; only the claim whose guard still matched may send, and only the holder of the
current claim token may record the outcome. A dispatcher that dies mid-POST leaves the row
pending; it is retried once the lease runs out (at-least-once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpcore
import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from fluxserve import __version__
from fluxserve.dependencies import transient_dependency
from fluxserve.fetching import FetchError, FetchPolicy, Resolver, UrlRefused, check_webhook_url, pinned
from fluxserve.jobs.database import rowcount
from fluxserve.jobs.deliveries import receiver_of
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

DELIVERED, RETRY, FAILED, DEAD = "delivered", "retry", "failed", "dead"  # what on_result receives
RETRYABLE_STATUS = frozenset({408, 429})  # plus every 5xx
RETRY_AFTER_STATUS = frozenset({429, 503})
MAX_ERROR_CHARS = 300
# the claim's lease beyond the POST's deadline: the URL check's DNS lookup (not interruptible),
# the key and the outcome in the database; a dispatcher presumed dead after that is re-sent
LEASE_MARGIN_SECONDS = 60.0


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


# -- the whole-POST deadline ----------------------------------------------------------------------
class _Deadline(threading.local):
    """When (``time.monotonic()``) the POST running on this thread must be over; each POST
    runs on its own thread, and the sync httpcore backend does its I/O on the caller's."""

    at: float | None = None


_deadline = _Deadline()


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of this thread's deadline; ``expired`` once it passed."""
    at = _deadline.at
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the webhook POST's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every operation ends by the deadline: one read is one ``recv`` (or
    one TLS record read, which CPython bounds as a whole), and writes are sent here, one
    ``send`` at a time, each bounded by what is left (the sync stream's own loop re-arms the
    full timeout for every partial send)."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        sock = self._inner.get_extra_info("socket")
        if sock is None:
            self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))
            return
        data = memoryview(buffer)
        while data:
            wait = _left(timeout, httpcore.WriteTimeout)
            try:
                sock.settimeout(wait)
                sent = sock.send(data)
            except TimeoutError as exc:  # socket.timeout
                raise httpcore.WriteTimeout(exc) from exc
            except OSError as exc:
                raise httpcore.WriteError(exc) from exc
            data = data[sent:]

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(
            host, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's transport over the deadline backend. httpx takes no network backend, so its
    connection pool is rebuilt with the same settings and ours (``_pool`` is what
    ``HTTPTransport.handle_request`` sends through; ``tests/test_webhook_delivery.py`` checks
    the deadline holds, so a change there cannot go unnoticed)."""

    def __init__(self) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=None,  # the dispatcher bounds its threads itself
            max_keepalive_connections=0,  # no stale pooled connections; each POST pinned on its own
            network_backend=_DeadlineBackend(),
        )


# -- the dispatcher ------------------------------------------------------------------------------
_POOL_FULL, _HOST_FULL = "pool full", "host full"


class WebhookDispatcher:
    """Delivers pending ``WebhookDelivery`` rows; see the module docstring."""

    def __init__(
        self, sessions: sessionmaker[Session], *, timeout_seconds: float = 30.0, poll_seconds: float = 0.5,
        max_backoff_seconds: float = 300.0, base_backoff_seconds: float = 1.0,
        on_result: Callable[[str], None] | None = None,
        batch_size: int = 50, lease_seconds: float | None = None, fetch_policy: FetchPolicy | None = None,
        resolver: Resolver | None = None, concurrency: int = 16, per_host: int = 4,
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
        self.concurrency = max(1, int(concurrency))
        self.per_host = max(1, int(per_host))
        # one POST ends by its deadline; the claim must outlast that, or another dispatcher re-sends
        self.lease_seconds = (float(lease_seconds) if lease_seconds is not None
                              else self.timeout_seconds + LEASE_MARGIN_SECONDS)
        self._on_result = on_result
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.timeout_seconds), follow_redirects=False, trust_env=False,
            transport=_DeadlineTransport(),
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # POSTs in flight: per receiver, and their threads (stop() waits for them)
        self._slots = threading.Condition()
        self._in_flight: dict[str, int] = {}
        self._posts: set[threading.Thread] = set()
        self._wake = threading.Event()  # a slot came free (or stop): the loop looks again at once

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
        """Stop the loop (it starts no new POST) and wait for the POSTs in flight, all within
        ``timeout`` (default: the POST timeout + 5 s; each POST ends by its deadline anyway).
        A POST cut short by the process exiting leaves its row pending; it is sent again once
        its lease runs out."""
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        self._wake.set()
        deadline = time.monotonic() + (self.timeout_seconds + 5.0 if timeout is None else timeout)
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._slots:
            posts = list(self._posts)
        for post in posts:
            post.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.stop()
        self._client.close()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def in_flight(self) -> dict[str, int]:
        """POSTs in flight per receiver (``scheme://host[:port]``)."""
        with self._slots:
            return {receiver: count for receiver, count in self._in_flight.items() if count}

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            try:
                self._pass(None, stop=stop)
            except Exception as exc:  # never die: the database may be briefly unreachable
                if transient_dependency(exc) is None:
                    log.exception("webhook dispatcher pass failed; retrying in %.1fs", self.poll_seconds)
                else:  # an outage: the worker and the API log it once; no traceback per pass
                    log.debug("webhook dispatcher pass skipped: %s", exc)
            self._wake.wait(self.poll_seconds)

    # -- one pass --------------------------------------------------------------------------------
    def deliver_due(self, now: datetime | None = None) -> int:
        """POST every due pending delivery (oldest first, at most ``batch_size``) that this
        dispatcher manages to claim, concurrently within the limits (waiting for a slot when a
        receiver is at its limit), and wait for them. ``now`` pins the clock (tests); by
        default each delivery uses the current time. Returns how many deliveries were attempted."""
        return self._pass(now, wait=True)

    def _pass(self, now: datetime | None, *, stop: threading.Event | None = None, wait: bool = False) -> int:
        """Start POSTs for due rows. The background loop (``wait=False``) skips rows whose
        receiver is at its limit, without claiming them, and stops at a full pool; their next
        pass comes when a slot frees. ``wait=True`` waits for slots, then for the POSTs."""
        pass_now = now or utcnow()
        with self._slots:
            if not wait and sum(self._in_flight.values()) >= self.concurrency:
                return 0
            full = [] if wait else [receiver for receiver, n in self._in_flight.items() if n >= self.per_host]
        query = (
            select(WebhookDelivery.id, WebhookDelivery.attempts, WebhookDelivery.receiver, WebhookDelivery.url)
            .where(WebhookDelivery.status == DeliveryStatus.PENDING.value, WebhookDelivery.next_attempt_at <= pass_now)
        )
        if full:  # so that a busy receiver's backlog never hides other receivers' rows from the page
            query = query.where(or_(WebhookDelivery.receiver.is_(None), WebhookDelivery.receiver.not_in(full)))
        with self._sessions() as session:
            due = session.execute(
                query.order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(self.batch_size)
            ).all()
        started: list[threading.Thread] = []
        for delivery_id, seen_attempts, receiver, url in due:
            if stop is not None and stop.is_set():
                break
            receiver = receiver or receiver_of(url)  # rows from older releases have none
            refused = self._reserve(receiver, wait=wait)
            if refused == _POOL_FULL:
                break
            if refused == _HOST_FULL:
                continue  # left due, unclaimed
            try:
                row = self._claim(delivery_id, seen_attempts, receiver, now or utcnow())
            except BaseException:
                self._release(receiver)
                raise
            if row is None:  # another dispatcher got it
                self._release(receiver)
                continue
            started.append(self._start(row, receiver, seen_attempts + 1, now))
        if wait:
            for thread in started:
                thread.join()
        return len(started)

    def _reserve(self, receiver: str, *, wait: bool) -> str | None:
        """Take a slot for a POST to ``receiver``: None when taken, else why not (or wait)."""
        with self._slots:
            while True:
                if sum(self._in_flight.values()) >= self.concurrency:
                    refused = _POOL_FULL
                elif self._in_flight.get(receiver, 0) >= self.per_host:
                    refused = _HOST_FULL
                else:
                    self._in_flight[receiver] = self._in_flight.get(receiver, 0) + 1
                    return None
                if not wait:
                    return refused
                self._slots.wait()

    def _release(self, receiver: str) -> None:
        with self._slots:
            left = self._in_flight.get(receiver, 0) - 1
            if left > 0:
                self._in_flight[receiver] = left
            else:
                self._in_flight.pop(receiver, None)
            self._posts.discard(threading.current_thread())
            self._slots.notify_all()
        self._wake.set()

    def _start(self, row: WebhookDelivery, receiver: str, attempt: int, now: datetime | None) -> threading.Thread:
        thread = threading.Thread(target=self._deliver, args=(row, receiver, attempt, now),
                                  name=f"fluxserve-webhook-{row.id}", daemon=True)
        with self._slots:
            self._posts.add(thread)
        thread.start()
        return thread

    def _claim(self, delivery_id: int, seen_attempts: int, receiver: str, now: datetime) -> WebhookDelivery | None:
        """Guarded UPDATE: only one dispatcher can move a row from (due, n attempts) to
        (leased, n+1 attempts, its claim token). Returns the claimed row, or None if another
        one got it."""
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
                    attempts=seen_attempts + 1, claim_token=str(uuid.uuid4()), receiver=receiver,
                    next_attempt_at=now + timedelta(seconds=self.lease_seconds),
                )
                .execution_options(synchronize_session=False)
            ))
        if not claimed:
            return None
        with self._sessions() as session:
            return session.get(WebhookDelivery, delivery_id)

    def _deliver(self, row: WebhookDelivery, receiver: str, attempt: int, now: datetime | None) -> None:
        """One attempt, on its own thread: POST, record the outcome, free the slot."""
        try:
            try:
                secret = self._keys.webhook_secret(row.key_id)
                result = self._post(row, secret)
            except Exception as exc:  # a bug or the database: keep the delivery, retry later
                log.exception("webhook delivery %s (job %s): internal error", row.id, row.job_id)
                result = _Result(RETRY, f"internal error: {type(exc).__name__}")
            self._record(row, attempt, result, now or utcnow())
        except Exception:  # the database: the row stays claimed and is retried after its lease
            log.exception("webhook delivery %s (job %s): the outcome could not be recorded", row.id, row.job_id)
        finally:
            self._release(receiver)

    def _post(self, row: WebhookDelivery, secret: str) -> _Result:
        deadline = time.monotonic() + self.timeout_seconds  # the whole POST, the URL check included
        body = serialize(row.payload)  # serialized once: the signature covers exactly these bytes
        headers = build_headers(secret, int(time.time()), body, job_id=row.job_id, delivery_id=row.id)
        try:
            target = check_webhook_url(row.url, self._policy, self._resolver)
        except UrlRefused as exc:
            return _Result(FAILED, _short(f"webhook URL refused: {exc}"))
        except FetchError as exc:  # e.g. the name does not resolve right now
            return _Result(RETRY, _short(f"webhook URL: {exc}"))
        url, pin_headers, extensions = pinned(target, row.url)
        _deadline.at = deadline
        try:
            with self._client.stream("POST", url, content=body, headers={**headers, **pin_headers},
                                     extensions=extensions) as response:
                status = response.status_code  # the body is never read: only the status matters
                retry_after = response.headers.get("retry-after")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            return _Result(FAILED, _short(f"invalid webhook URL: {type(exc).__name__}"))
        except httpx.TimeoutException as exc:
            return _Result(RETRY, f"timeout: no answer within {self.timeout_seconds:g}s ({type(exc).__name__})")
        except httpx.TransportError as exc:
            return _Result(RETRY, _short(f"connection error: {type(exc).__name__}: {exc}"))
        finally:
            _deadline.at = None
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
                outcome = DEAD
                error = _short(f"{error}; gave up after {attempt} attempt(s): retry period over (dead letter)")
                values = {"status": DeliveryStatus.DEAD.value, "last_error": error, "next_attempt_at": at,
                          "gave_up_at": at}
            else:
                values = {"last_error": error, "next_attempt_at": next_at}
        else:
            values = {"status": DeliveryStatus.FAILED.value, "last_error": error, "next_attempt_at": at,
                      "gave_up_at": at}
        with self._sessions.begin() as session:
            kept = rowcount(session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == row.id,
                    WebhookDelivery.status == DeliveryStatus.PENDING.value,
                    WebhookDelivery.claim_token == row.claim_token,  # still our claim
                )
                .values(claim_token=None, **values)
                .execution_options(synchronize_session=False)
            ))
        receiver = receiver_of(row.url)  # only the receiver is logged: a URL's path or query may hold a token
        if not kept:
            log.warning("webhook delivery %s (job %s): claim expired before the outcome (%s) was recorded",
                        row.id, row.job_id, outcome)
        elif outcome == DELIVERED:
            log.info("webhook delivery %s (job %s) to %s delivered (attempt %d)", row.id, row.job_id, receiver, attempt)
        elif outcome == RETRY:
            log.info("webhook delivery %s (job %s) to %s: %s; retry at %s (attempt %d)", row.id, row.job_id,
                     receiver, error, values["next_attempt_at"].isoformat(), attempt)
        else:
            log.warning("webhook delivery %s (job %s) to %s %s: %s", row.id, row.job_id, receiver, outcome, error)
        if self._on_result is not None:
            try:
                self._on_result(outcome)
            except Exception:
                log.exception("webhook on_result callback failed")
