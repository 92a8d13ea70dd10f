"""Webhook delivery against real loopback receivers: signatures, retries with backoff,
persistence across a restart, permanent failures, the retry period (then a dead letter), and
two dispatchers sharing one database (SQLite, and PostgreSQL where its server binaries are
installed). Concurrency, the whole-POST deadline and the admin routes: test_webhook_delivery.py."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import itertools
import json
import logging
import socket
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from fluxserve import __version__
from fluxserve.fetching import FetchPolicy
from fluxserve.jobs.database import open_database
from fluxserve.jobs.status import DeliveryStatus
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import WebhookDelivery, utcnow
from fluxserve.keys import KeyStore
from fluxserve.webhooks import WebhookDispatcher, backoff_seconds, parse_retry_after, serialize, sign, verify
from tests.support.postgres import create_database
from tests.support.waiting import wait_until

_db_names = itertools.count(1)


# -- a scripted receiver ---------------------------------------------------------------------------
@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    action: str  # what the receiver did: "200", "503", "reset", "sleep", ...


@dataclass
class Receiver:
    """A loopback HTTP server whose answers follow ``script`` (one entry per request, then
    ``default``). Entries: an int status; (429, {"Retry-After": "1"}) for headers; "reset"
    (RST without an answer); ("sleep", seconds) then 200, too late for the dispatcher."""

    port: int
    script: list = field(default_factory=list)
    default: object = 200
    delay: float = 0.0  # before every answer
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/fluxserve?token=receiver-token"

    def next_action(self):
        with self.lock:
            return self.script.pop(0) if self.script else self.default

    def accepted(self) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.action == "200"]

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def receiver_running(receiver: Receiver):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            action = receiver.next_action()
            headers: dict[str, str] = {}
            if isinstance(action, tuple) and action[0] == "sleep":
                label = "sleep"
            elif isinstance(action, tuple):
                action, headers = action
                label = str(action)
            else:
                label = str(action)
            with receiver.lock:
                receiver.requests.append(Received(dict(self.headers.items()), body, label))
            if receiver.delay:
                time.sleep(receiver.delay)
            if label == "reset":
                self.close_connection = True
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.request.close()
                return
            if label == "sleep":
                time.sleep(action[1])
                action = 200
            try:
                self.send_response(int(action))
                for name, value in headers.items():
                    self.send_header(name, value)
                if 300 <= int(action) < 400:
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:
                pass  # the dispatcher already gave up on this one

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

        def handle_error(self, request, client_address):  # resets and late answers are expected
            pass

    server = Server(("127.0.0.1", receiver.port), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def receiver():
    with receiver_running(Receiver(free_port())) as running:
        yield running


# -- databases -------------------------------------------------------------------------------------
@pytest.fixture
def open_db(tmp_path):
    """open_db(url=None) -> a session factory; the engines are disposed after the test."""
    opened = []

    def _open(url: str | None = None):
        sessions = open_database(url or f"sqlite:///{tmp_path / 'hooks.db'}")
        opened.append(sessions)
        return sessions

    yield _open
    for sessions in opened:
        sessions.kw["bind"].dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return create_database(request.getfixturevalue("postgres_server"), f"hooks_{next(_db_names)}")


@pytest.fixture
def sessions(open_db):
    return open_db()


@pytest.fixture
def dispatchers():
    """make(sessions, **kw) -> a fast WebhookDispatcher; all are stopped and closed after."""
    made = []

    def make(sessions, **kwargs):
        kwargs = {"timeout_seconds": 0.5, "poll_seconds": 0.02, "base_backoff_seconds": 0.05,
                  "max_backoff_seconds": 0.2, **kwargs}
        kwargs.setdefault("fetch_policy", FetchPolicy(allow=("127.0.0.1/32",)))  # receivers are on loopback
        dispatcher = WebhookDispatcher(sessions, **kwargs)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.close()


def success_payload(job, outputs):
    """ModelsLab's success webhook body."""
    return {
        "status": "success", "generationTime": 0.1, "id": job.id, "output": outputs, "proxy_links": outputs,
        "nsfw_content_detected": False, "webhook_status": "", "track_id": job.track_id,
        "meta": {"prompt": "a red fox", "seed": 7, "W": 512, "H": 512}, "tip": "",
    }


def finish_job(sessions, key_id: int, url: str, *, ok: bool = True, store: JobStore | None = None, track_id="t1"):
    jobs = store or JobStore(sessions)
    jobs.create(key_id=key_id, server="flux_klein", model="flux-klein", task="text2img",
                params={"prompt": "a red fox"}, meta={"prompt": "a red fox"}, file_prefix="x",
                webhook=url, track_id=track_id)
    job = jobs.claim_next()
    if ok:
        outputs = [f"http://127.0.0.1/generations/{job.id}-0.png"]
        assert jobs.succeed(job.id, job.claim_token, outputs=outputs, nsfw_detected=False, generation_time=0.1,
                            meta={"prompt": "a red fox"}, webhook_payload=success_payload(job, outputs))
    else:
        assert jobs.fail(job.id, job.claim_token, "CUDA out of memory")
    return job


def deliveries(sessions) -> list[WebhookDelivery]:
    with sessions() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def delivery_for(sessions, job_id: int) -> WebhookDelivery:
    with sessions() as session:
        return session.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))


def later(seconds: float):
    return utcnow() + timedelta(seconds=seconds)


# -- signing ---------------------------------------------------------------------------------------
def test_sign_is_hmac_sha256_over_timestamp_dot_body():
    body = b'{"id":1,"status":"success"}'
    expected = hmac.new(b"whsec_abc", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("whsec_abc", 1700000000, body) == expected
    assert verify("whsec_abc", "1700000000", body, "sha256=" + expected, now=1700000100)
    assert verify("whsec_abc", 1700000000, body, expected, now=1700000100)  # bare hex too
    assert not verify("whsec_abc", 1700000000, body, "sha256=" + expected, now=1700000301)  # too old
    assert not verify("whsec_abc", 1700000000, body, "sha256=" + expected, now=1699999600)  # from the future
    assert not verify("whsec_abc", "soon", body, "sha256=" + expected, now=1700000000)
    assert not verify("whsec_abc", 1700000000, body, "sha256=" + expected[:-1] + "é", now=1700000000)
    # the timestamp is signed: moving it (a replay with a fresh timestamp) breaks the signature
    assert not verify("whsec_abc", 1700000100, body, "sha256=" + expected, now=1700000100)


def test_backoff_is_exponential_with_full_jitter_and_a_cap():
    top = lambda low, high: high  # noqa: E731 - the jitter's upper end
    assert [backoff_seconds(n, base=1, cap=300, rng=top) for n in (1, 2, 3, 4, 9, 10, 200)] == \
        [1, 2, 4, 8, 256, 300, 300]
    assert backoff_seconds(5, base=1, cap=300, rng=lambda low, high: low) == 1  # floored at base
    samples = {backoff_seconds(6, base=1, cap=300) for _ in range(50)}
    assert len(samples) > 10 and all(1 <= s <= 32 for s in samples)
    now = utcnow()
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after("garbage", now) is None
    date = (now + timedelta(seconds=120)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 100 < parse_retry_after(date, now) <= 120


# -- delivery --------------------------------------------------------------------------------------
def test_success_and_failure_webhooks_are_posted_signed_with_track_id(sessions, receiver, dispatchers, caplog):
    caplog.set_level(logging.DEBUG, logger="fluxserve.webhooks")
    keys = KeyStore(sessions)
    key, _ = keys.create("hooks")
    secret = keys.webhook_secret(key.id)
    ok_job = finish_job(sessions, key.id, receiver.url, ok=True)
    bad_job = finish_job(sessions, key.id, receiver.url, ok=False)
    outcomes = []
    dispatcher = dispatchers(sessions, on_result=outcomes.append)

    assert dispatcher.deliver_due() == 2
    assert dispatcher.deliver_due() == 0  # nothing left to send
    assert outcomes == ["delivered", "delivered"]
    assert receiver.count() == 2

    rows = {row.job_id: row for row in deliveries(sessions)}
    by_job = {json.loads(r.body)["id"]: r for r in receiver.requests}
    for job in (ok_job, bad_job):
        row, request = rows[job.id], by_job[job.id]
        assert row.status == DeliveryStatus.DELIVERED.value and row.attempts == 1 and row.delivered_at is not None
        assert JobStore(sessions).webhook_status(job.id) == "delivered"
        headers = {name.lower(): value for name, value in request.headers.items()}
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"] == f"fluxserve-webhooks/{__version__}"
        assert headers["x-fluxserve-delivery"] == str(row.id)
        assert headers["idempotency-key"] == f"fluxserve-job-{job.id}-{row.id}"
        assert abs(int(headers["x-fluxserve-timestamp"]) - time.time()) < 30
        assert headers["x-fluxserve-signature"].startswith("sha256=")
        assert request.body == serialize(row.payload)
        assert request.body == json.dumps(row.payload, separators=(",", ":"), sort_keys=True).encode()
        payload = json.loads(request.body)
        assert payload["track_id"] == "t1"
        # what a receiver does
        stamp, signature = headers["x-fluxserve-timestamp"], headers["x-fluxserve-signature"]
        assert verify(secret, stamp, request.body, signature)
        assert not verify("whsec_wrong", stamp, request.body, signature)
        assert not verify(secret, stamp, request.body.replace(b"t1", b"t2"), signature)
        assert not verify(secret, stamp, request.body, signature, now=int(stamp) + 301)

    assert json.loads(by_job[ok_job.id].body)["status"] == "success"
    assert json.loads(by_job[ok_job.id].body)["output"] == rows[ok_job.id].payload["output"]
    failure = json.loads(by_job[bad_job.id].body)
    assert failure == {"status": "failed", "id": bad_job.id, "message": "CUDA out of memory", "track_id": "t1"}
    # never logged: the secret, the payload, the receiver's token in the URL
    assert secret not in caplog.text and "a red fox" not in caplog.text and "receiver-token" not in caplog.text
    assert "delivered" in caplog.text


def test_refusals_are_retried_with_backoff_until_accepted(sessions, receiver, dispatchers):
    """503, then 429 with Retry-After, then a connection reset, then a timeout, then 200."""
    key, _ = KeyStore(sessions).create("hooks")
    secret = KeyStore(sessions).webhook_secret(key.id)
    job = finish_job(sessions, key.id, receiver.url)
    receiver.script = [503, (429, {"Retry-After": "30"}), "reset", ("sleep", 1.5), 200]
    outcomes = []
    dispatcher = dispatchers(sessions, on_result=outcomes.append)

    t0 = utcnow()
    assert dispatcher.deliver_due(now=t0) == 1
    row = delivery_for(sessions, job.id)
    assert (row.status, row.attempts, row.last_error) == ("pending", 1, "HTTP 503")
    assert t0 < row.next_attempt_at <= t0 + timedelta(seconds=0.2)
    assert dispatcher.deliver_due(now=t0) == 0  # not due yet

    t1 = t0 + timedelta(seconds=1)
    assert dispatcher.deliver_due(now=t1) == 1
    row = delivery_for(sessions, job.id)
    assert (row.status, row.attempts, row.last_error) == ("pending", 2, "HTTP 429")
    assert row.next_attempt_at >= t1 + timedelta(seconds=29)  # Retry-After beats the small backoff
    assert dispatcher.deliver_due(now=t1 + timedelta(seconds=20)) == 0

    t2 = t1 + timedelta(seconds=31)
    assert dispatcher.deliver_due(now=t2) == 1
    row = delivery_for(sessions, job.id)
    assert (row.status, row.attempts) == ("pending", 3) and row.last_error.startswith("connection error")

    t3 = t2 + timedelta(seconds=1)
    assert dispatcher.deliver_due(now=t3) == 1
    row = delivery_for(sessions, job.id)
    assert (row.status, row.attempts) == ("pending", 4) and row.last_error.startswith("timeout")

    assert dispatcher.deliver_due(now=t3 + timedelta(seconds=1)) == 1
    row = delivery_for(sessions, job.id)
    assert (row.status, row.attempts) == ("delivered", 5) and row.delivered_at is not None
    assert outcomes == ["retry"] * 4 + ["delivered"]

    assert [r.action for r in receiver.requests] == ["503", "429", "reset", "sleep", "200"]
    assert len({r.headers["Idempotency-Key"] for r in receiver.requests}) == 1  # same key on every retry
    assert {r.headers["Idempotency-Key"] for r in receiver.requests} == {f"fluxserve-job-{job.id}-{row.id}"}
    assert {r.headers["X-Fluxserve-Delivery"] for r in receiver.requests} == {str(row.id)}
    assert len({r.body for r in receiver.requests}) == 1
    for request in receiver.requests:
        assert verify(secret, request.headers["X-Fluxserve-Timestamp"], request.body,
                      request.headers["X-Fluxserve-Signature"])


def test_background_dispatcher_gets_every_payload_through_a_flaky_receiver(sessions, receiver, dispatchers):
    key, _ = KeyStore(sessions).create("hooks")
    jobs = [finish_job(sessions, key.id, receiver.url, ok=ok, track_id=f"t{i}")
            for i, ok in enumerate([True, False, True])]
    receiver.script = [503, (429, {"Retry-After": "1"}), "reset", ("sleep", 1.0), 502]
    dispatcher = dispatchers(sessions)
    dispatcher.start()
    wait_until(lambda: all(r.status == "delivered" for r in deliveries(sessions)), 15, "every delivery")
    dispatcher.stop()

    accepted = {json.loads(r.body)["track_id"] for r in receiver.accepted()}
    assert accepted == {"t0", "t1", "t2"}  # every payload got through (duplicates allowed)
    rows = deliveries(sessions)
    assert {row.job_id for row in rows} == {job.id for job in jobs}
    assert max(row.attempts for row in rows) >= 2  # retried
    assert sum(row.attempts for row in rows) == receiver.count()  # every POST counted


def test_pending_delivery_survives_a_restart(db_url, open_db, dispatchers):
    receiver = Receiver(free_port())  # not listening yet: connection refused
    sessions = open_db(db_url)
    key, _ = KeyStore(sessions).create("hooks")
    job = finish_job(sessions, key.id, receiver.url)
    first = dispatchers(sessions)
    first.start()
    wait_until(lambda: delivery_for(sessions, job.id).attempts >= 2, 10, "failed attempts")
    first.stop()
    first.close()
    row = delivery_for(sessions, job.id)
    assert row.status == "pending" and row.last_error.startswith("connection error")
    sessions.kw["bind"].dispose()  # the process is gone

    reopened = open_db(db_url)
    with receiver_running(receiver):
        second = dispatchers(reopened)
        second.start()
        wait_until(lambda: delivery_for(reopened, job.id).status == "delivered", 10, "delivery after restart")
        second.stop()
    assert [json.loads(r.body)["id"] for r in receiver.requests] == [job.id]
    assert delivery_for(reopened, job.id).attempts >= 3


@pytest.mark.parametrize("status", [400, 404, 410, 302])
def test_client_errors_and_redirects_fail_at_once(sessions, receiver, dispatchers, status):
    key, _ = KeyStore(sessions).create("hooks")
    job = finish_job(sessions, key.id, receiver.url)
    receiver.default = status
    outcomes = []
    dispatcher = dispatchers(sessions, on_result=outcomes.append)
    assert dispatcher.deliver_due() == 1
    assert dispatcher.deliver_due(now=later(3600)) == 0  # never retried
    row = delivery_for(sessions, job.id)
    assert (row.status, row.attempts, row.delivered_at) == ("failed", 1, None)
    assert row.last_error.startswith(f"HTTP {status}")
    assert outcomes == ["failed"]
    assert receiver.count() == 1  # a redirect is not followed
    assert JobStore(sessions).webhook_status(job.id) == "failed"


def test_retry_period_over_makes_the_delivery_a_dead_letter(sessions, receiver, dispatchers):
    key, _ = KeyStore(sessions).create("hooks")
    short = JobStore(sessions, webhook_retry_seconds=5)
    job = finish_job(sessions, key.id, receiver.url, store=short)
    receiver.default = 503
    dispatcher = dispatchers(sessions, base_backoff_seconds=1, max_backoff_seconds=1)
    start = utcnow()
    for step in range(3):  # a 1 s backoff still lands inside the 5 s retry period
        assert dispatcher.deliver_due(now=start + timedelta(seconds=1.5 * step)) == 1
        assert delivery_for(sessions, job.id).status == "pending"
    assert dispatcher.deliver_due(now=start + timedelta(seconds=4.5)) == 1  # the next try would pass give_up_at
    row = delivery_for(sessions, job.id)
    assert (row.status, row.attempts) == ("dead", 4) and row.gave_up_at is not None
    assert "HTTP 503" in row.last_error and "retry period" in row.last_error
    assert dispatcher.deliver_due(now=later(3600)) == 0
    assert short.webhook_status(job.id) == "dead"


def test_delivery_already_past_give_up_at_gets_one_last_try(sessions, receiver, dispatchers):
    key, _ = KeyStore(sessions).create("hooks")
    down = Receiver(free_port())  # nobody listening
    lost = finish_job(sessions, key.id, down.url, track_id="lost")
    late = finish_job(sessions, key.id, receiver.url, track_id="late")
    with sessions.begin() as session:  # e.g. the server was off for longer than the retry period
        session.execute(update(WebhookDelivery).values(give_up_at=utcnow() - timedelta(seconds=1)))
    outcomes = []
    dispatcher = dispatchers(sessions, on_result=outcomes.append)
    assert dispatcher.deliver_due() == 2
    assert sorted(outcomes) == ["dead", "delivered"]
    assert delivery_for(sessions, late.id).status == "delivered"
    row = delivery_for(sessions, lost.id)
    assert (row.status, row.attempts) == ("dead", 1) and "retry period" in row.last_error


def test_two_dispatchers_on_one_database_deliver_each_webhook_exactly_once(db_url, open_db, receiver, dispatchers):
    """Two server processes (two engines) sharing the database race for the same rows."""
    receiver.delay = 0.005
    first_db, second_db = open_db(db_url), open_db(db_url)
    key, _ = KeyStore(first_db).create("hooks")
    store = JobStore(first_db)
    jobs = [finish_job(first_db, key.id, receiver.url, store=store, track_id=f"t{i}") for i in range(30)]
    both = [dispatchers(first_db, poll_seconds=0.001), dispatchers(second_db, poll_seconds=0.001)]
    results = [0, 0]
    barrier = threading.Barrier(2)

    def race(index):
        barrier.wait()
        results[index] = both[index].deliver_due()

    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(results) == len(jobs) and all(results)  # both took part, no row sent twice

    more = [finish_job(first_db, key.id, receiver.url, store=store, track_id=f"u{i}") for i in range(20)]
    for dispatcher in both:  # and the background loops, polling as fast as they can
        dispatcher.start()
    wait_until(lambda: all(r.status == "delivered" for r in deliveries(first_db)), 15, "every delivery")
    for dispatcher in both:
        dispatcher.stop()

    ids = [r.headers["X-Fluxserve-Delivery"] for r in receiver.requests]
    assert len(ids) == len(set(ids)) == len(jobs) + len(more)
    assert all(row.attempts == 1 for row in deliveries(second_db))


def test_dispatcher_loop_survives_errors_and_stops_promptly(sessions, receiver, dispatchers, monkeypatch, caplog):
    key, _ = KeyStore(sessions).create("hooks")
    job = finish_job(sessions, key.id, receiver.url)
    dispatcher = dispatchers(sessions, poll_seconds=0.05, on_result=lambda outcome: 1 / 0)
    real_pass, calls = dispatcher._pass, []

    def flaky_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database went away")
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(dispatcher, "_pass", flaky_pass)
    dispatcher.start()
    wait_until(lambda: delivery_for(sessions, job.id).status == "delivered", 10, "delivery")
    assert dispatcher.running and "database went away" in caplog.text
    dispatcher.poll_seconds = 30  # stop() must not wait for the next poll
    time.sleep(0.1)
    started = time.monotonic()
    dispatcher.stop()
    assert time.monotonic() - started < 2 and not dispatcher.running
