"""Webhooks without head-of-line blocking, against real loopback receivers: a slow receiver
does not delay another receiver's webhook, the per-host limit holds (and rows beyond it stay
unclaimed), one POST ends by its deadline however the receiver trickles, stop() waits for the
POSTs in flight, and dead letters are listed and replayed by admins (not by other keys)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text

from fluxserve.api.app import create_app
from fluxserve.config import Settings
from fluxserve.fetching import FetchPolicy
from fluxserve.jobs.database import open_database
from fluxserve.jobs.deliveries import WebhookDeliveries, receiver_of
from fluxserve.jobs.status import DeliveryStatus
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import Base, WebhookDelivery, utcnow
from fluxserve.keys import KeyStore
from fluxserve.models import Registry
from fluxserve.webhooks import LEASE_MARGIN_SECONDS, WebhookDispatcher, _Result, verify
from tests.support.waiting import wait_until
from tests.test_webhooks import Receiver, delivery_for, free_port, receiver_running, success_payload

ADMIN_LIST = "/api/fluxserve/webhooks/deliveries"


# -- helpers ---------------------------------------------------------------------------------------
@pytest.fixture
def new_db(tmp_path):
    """new_db() -> a session factory on a fresh SQLite file; engines disposed after the test."""
    opened = []

    def _open():
        sessions = open_database(f"sqlite:///{tmp_path / f'hooks-{len(opened)}.db'}")
        opened.append(sessions)
        return sessions

    yield _open
    for sessions in opened:
        sessions.kw["bind"].dispose()


@pytest.fixture
def make_dispatcher():
    made = []

    def make(sessions, **kwargs):
        kwargs = {"timeout_seconds": 1.0, "poll_seconds": 0.02, "base_backoff_seconds": 0.05,
                  "max_backoff_seconds": 0.2, "fetch_policy": FetchPolicy(allow=("127.0.0.1/32",)), **kwargs}
        dispatcher = WebhookDispatcher(sessions, **kwargs)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.close()


def finished(store: JobStore, key_id: int, url: str, track_id: str = "t"):
    """A succeeded job with a webhook (its delivery row is pending, due now)."""
    job = store.create(key_id=key_id, server="v6", model="flux", task="text2img",
                       params={"prompt": "a red fox", "seeds": [7]}, meta={"prompt": "a red fox"},
                       file_prefix=f"f{track_id}", webhook=url, track_id=track_id)
    job = store.claim_next()
    outputs = [f"http://127.0.0.1/outputs/{job.id}-0.png"]
    assert store.succeed(job.id, job.claim_token, outputs=outputs, nsfw_detected=False, generation_time=0.1,
                         meta={"prompt": "a red fox"}, webhook_payload=success_payload(job, outputs))
    return job


def all_delivered(sessions) -> bool:
    with sessions() as session:
        return set(session.scalars(select(WebhookDelivery.status))) == {"delivered"}


@dataclass
class Counting:
    """A loopback receiver that holds each POST ``hold`` seconds and counts how many it holds
    at once (``peak``); ``shared`` counts across several receivers."""

    port: int
    hold: float = 0.3
    shared: Counting | None = None
    now: int = 0
    peak: int = 0
    arrivals: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=receiver-token"

    def enter(self) -> None:
        for counter in (self, self.shared):
            if counter is not None:
                with counter.lock:
                    counter.now += 1
                    counter.peak = max(counter.peak, counter.now)
                    counter.arrivals.append(time.monotonic())

    def leave(self) -> None:
        for counter in (self, self.shared):
            if counter is not None:
                with counter.lock:
                    counter.now -= 1


@contextmanager
def counting(receiver: Counting):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            receiver.enter()
            try:
                time.sleep(receiver.hold)
            finally:
                receiver.leave()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", receiver.port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def trickling(mode: str):
    """A raw receiver. "headers": the status line, then one header byte every 0.1 s (never a
    whole header block: each read returns within any per-read timeout). "body": the whole
    header block at once, then one body byte every 0.1 s. "slow-reader": reads the request
    64 KiB every 50 ms through a 64 KiB receive buffer, so that each send of a large body
    makes progress within any per-send timeout, while the whole body takes ~13 s for 16 MB
    (httpx's own write loop re-arms its timeout for every partial send)."""
    listener = socket.socket()
    if mode == "slow-reader":
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    done = threading.Event()

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                if mode == "slow-reader":
                    while not done.is_set() and conn.recv(65536):
                        time.sleep(0.05)
                    return
                conn.recv(65536)
                if mode == "headers":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                while not done.is_set():
                    conn.sendall(b"y")
                    time.sleep(0.1)
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    finally:
        done.set()
        listener.close()
        thread.join(5)


# -- no head-of-line blocking ----------------------------------------------------------------------
def _fast_webhook_latency(sessions, make_dispatcher, **limits) -> float:
    """Seconds until a fast receiver gets its webhook, queued after three for a receiver that
    answers after 5 s (past the 1 s deadline)."""
    key, _ = KeyStore(sessions).create("hooks")
    store = JobStore(sessions)
    slow, fast = Receiver(free_port(), default=("sleep", 5.0)), Receiver(free_port())
    with receiver_running(slow), receiver_running(fast):
        for i in range(3):  # older: first in line
            finished(store, key.id, slow.url, track_id=f"slow{i}")
        finished(store, key.id, fast.url, track_id="fast")
        dispatcher = make_dispatcher(sessions, base_backoff_seconds=10, max_backoff_seconds=10, **limits)
        started = time.monotonic()
        dispatcher.start()
        wait_until(lambda: fast.count(), 15, "the fast receiver's webhook", interval=0.002)
        latency = time.monotonic() - started
        dispatcher.stop(timeout=0.1)
    return latency


def test_a_slow_receiver_does_not_delay_another_receivers_webhook(new_db, make_dispatcher):
    one_at_a_time = _fast_webhook_latency(new_db(), make_dispatcher, concurrency=1)  # the old dispatcher
    concurrent = _fast_webhook_latency(new_db(), make_dispatcher)  # defaults: 16, 4 per host
    print(f"\nfast webhook beside a slow receiver (1 s deadline): one at a time {one_at_a_time:.3f}s, "
          f"concurrent {concurrent:.3f}s")
    assert one_at_a_time >= 3.0  # behind three timeouts
    assert concurrent < 0.5  # a fraction of the one second the slow receiver holds each POST


def test_per_host_limit_holds_and_rows_beyond_it_stay_unclaimed(new_db, make_dispatcher):
    sessions = new_db()
    key, _ = KeyStore(sessions).create("hooks")
    store = JobStore(sessions)
    total = Counting(0)
    busy, other = Counting(free_port(), hold=0.5, shared=total), Counting(free_port(), hold=0.5, shared=total)
    claimed_peak = {busy.url: 0}
    with counting(busy), counting(other):
        for i in range(10):
            finished(store, key.id, busy.url, track_id=f"b{i}")  # older than other's: first in line
        for i in range(4):
            finished(store, key.id, other.url, track_id=f"o{i}")
        dispatcher = make_dispatcher(sessions, concurrency=5, per_host=3)
        stop_sampling = threading.Event()

        def sample_claims():  # rows of busy's that are claimed (leased) but not finished
            while not stop_sampling.is_set():
                with sessions() as session:
                    claimed = session.scalar(select(func.count()).select_from(WebhookDelivery).where(
                        WebhookDelivery.url == busy.url, WebhookDelivery.status == "pending",
                        WebhookDelivery.attempts > 0))
                claimed_peak[busy.url] = max(claimed_peak[busy.url], claimed or 0)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample_claims, daemon=True)
        started = time.monotonic()
        sampler.start()
        dispatcher.start()
        wait_until(lambda: all_delivered(sessions), 15, "every delivery")
        stop_sampling.set()
        sampler.join(5)
        dispatcher.stop()
    print(f"\nper host 3, pool 5: peaks busy={busy.peak} other={other.peak} total={total.peak}; "
          f"busy rows claimed at once <= {claimed_peak[busy.url]}")
    assert busy.peak == 3 and other.peak <= 3 and total.peak == 5
    assert claimed_peak[busy.url] <= 3  # the 7 others waited unclaimed, due
    assert other.arrivals[0] - started < 0.4  # other's webhooks did not wait for busy's first 0.5 s POSTs
    assert len(busy.arrivals) == 10 and len(other.arrivals) == 4  # each once
    with sessions() as session:
        assert set(session.scalars(select(WebhookDelivery.attempts))) == {1}
        assert set(session.scalars(select(WebhookDelivery.receiver))) == {
            f"http://127.0.0.1:{busy.port}", f"http://127.0.0.1:{other.port}"}


def test_rows_of_a_full_receiver_do_not_hide_other_receivers_rows(new_db, make_dispatcher):
    """A page of due rows (batch_size) all for one busy receiver: the next pass skips that
    receiver in the query itself, so another receiver's newer row still goes out at once."""
    sessions = new_db()
    key, _ = KeyStore(sessions).create("hooks")
    store = JobStore(sessions)
    busy, other = Counting(free_port(), hold=3.0), Counting(free_port(), hold=0.0)
    with counting(busy), counting(other):
        for i in range(8):
            finished(store, key.id, busy.url, track_id=f"b{i}")
        other_job = finished(store, key.id, other.url, track_id="o")
        dispatcher = make_dispatcher(sessions, timeout_seconds=5.0, batch_size=4, per_host=2)
        started = time.monotonic()
        dispatcher.start()
        wait_until(lambda: delivery_for(sessions, other_job.id).status == "delivered", 5,
                   "the other receiver's webhook", interval=0.005)
        assert other.arrivals[0] - started < 1.0  # not after busy's 3 s POSTs
        assert dispatcher.in_flight == {f"http://127.0.0.1:{busy.port}": 2}  # busy's first two, still held
        assert time.monotonic() - started < 2.5
        dispatcher.stop()


# -- one POST, one deadline ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["headers", "slow-reader"])
def test_one_post_ends_by_its_deadline_however_the_receiver_trickles(new_db, make_dispatcher, mode):
    sessions = new_db()
    key, _ = KeyStore(sessions).create("hooks")
    store = JobStore(sessions)
    with trickling(mode) as url:
        job = finished(store, key.id, url)
        if mode == "slow-reader":  # a body larger than the socket buffers: the writes block
            with sessions.begin() as session:
                row = session.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id))
                row.payload = {**row.payload, "padding": "x" * (16 * 1024 * 1024)}
        dispatcher = make_dispatcher(sessions, timeout_seconds=1.0)
        post, took = dispatcher._post, []

        def timed_post(*args):  # the POST alone (a 16 MB row takes a while to load and sign)
            started = time.monotonic()
            try:
                return post(*args)
            finally:
                took.append(time.monotonic() - started)

        dispatcher._post = timed_post
        assert dispatcher.deliver_due() == 1
    row = delivery_for(sessions, job.id)
    print(f"\n{mode} trickle, 1 s deadline: the POST ended after {took[0]:.3f}s ({row.last_error})")
    assert 0.9 < took[0] < 4.0  # not the ~13 s the trickle would take (a busy machine adds to the 1 s)
    assert row.status == "pending" and row.last_error.startswith("timeout: no answer within 1s")


def test_a_body_that_never_ends_does_not_matter(new_db, make_dispatcher):
    """Only the status line and headers are read: the webhook is delivered at once."""
    sessions = new_db()
    key, _ = KeyStore(sessions).create("hooks")
    with trickling("body") as url:
        job = finished(JobStore(sessions), key.id, url)
        started = time.monotonic()
        assert make_dispatcher(sessions, timeout_seconds=5.0).deliver_due() == 1
        assert time.monotonic() - started < 1.0
    assert delivery_for(sessions, job.id).status == "delivered"


def test_defaults_promise_30_seconds_and_the_lease_outlasts_them(new_db):
    settings = Settings()
    assert (settings.webhook_timeout_seconds, settings.webhook_concurrency, settings.webhook_per_host) == (30, 16, 4)
    dispatcher = WebhookDispatcher(new_db())
    try:
        assert dispatcher.timeout_seconds == 30 and (dispatcher.concurrency, dispatcher.per_host) == (16, 4)
        assert dispatcher.lease_seconds == 30 + LEASE_MARGIN_SECONDS > 30
    finally:
        dispatcher.close()


# -- stopping --------------------------------------------------------------------------------------
def test_stop_waits_for_the_posts_in_flight_within_its_bound(new_db, make_dispatcher):
    sessions = new_db()
    key, _ = KeyStore(sessions).create("hooks")
    store = JobStore(sessions)
    receiver = Counting(free_port(), hold=0.5)
    with counting(receiver):
        done = finished(store, key.id, receiver.url, track_id="waited")
        dispatcher = make_dispatcher(sessions, timeout_seconds=3.0)
        dispatcher.start()
        wait_until(lambda: receiver.arrivals, 5, "the POST", interval=0.005)
        started = time.monotonic()
        dispatcher.stop()  # waits for the POST in flight (0.5 s), not for its bound (3 + 5 s)
        assert 0.2 < time.monotonic() - started < 6.0  # the upper bound is loose: a busy CI machine
        assert delivery_for(sessions, done.id).status == "delivered" and not dispatcher.in_flight

        receiver.hold = 10.0  # longer than the POST's deadline: only the stop's bound ends the wait
        cut = finished(store, key.id, receiver.url, track_id="cut")
        dispatcher.start()
        wait_until(lambda: len(receiver.arrivals) == 2, 5, "the second POST", interval=0.005)
        started = time.monotonic()
        dispatcher.stop(timeout=0.2)  # bounded: gives up waiting, the row keeps its lease
        assert time.monotonic() - started < 2.5  # well before the POST's own 3 s deadline
        row = delivery_for(sessions, cut.id)
        assert row.status == "pending" and row.attempts == 1 and row.next_attempt_at > utcnow() + timedelta(seconds=30)


# -- dead letters ----------------------------------------------------------------------------------
@pytest.fixture
def admin_api(tmp_path):
    """The API (no worker, no dispatcher) over a database with a 2 s webhook retry window."""
    settings = Settings(data_dir=tmp_path / "data", webhook_retry_seconds=2, fetch_allow=["127.0.0.1/32"],
                        rate_limit_per_key="", rate_limit_per_address="")
    sessions = open_database(settings.resolved_database_url)
    keys = KeyStore(sessions)
    user, user_key = keys.create("user")
    _, admin_key = keys.create("ops", admin=True)
    app = create_app(settings, Registry.build(), sessions=sessions)
    with TestClient(app) as client:
        yield client, sessions, user, user_key, admin_key
    sessions.kw["bind"].dispose()


def test_dead_letters_are_listed_and_replayed_by_admins(admin_api, make_dispatcher):
    client, sessions, user, user_key, admin_key = admin_api
    store = JobStore(sessions, webhook_retry_seconds=2)
    secret = KeyStore(sessions).webhook_secret(user.id)
    down, refusing = Receiver(free_port(), default=503), Receiver(free_port(), default=410)
    with receiver_running(down), receiver_running(refusing):
        dead_job = finished(store, user.id, down.url, track_id="dead")
        refused_job = finished(store, user.id, refusing.url, track_id="refused")
        dispatcher = make_dispatcher(sessions)
        t0 = utcnow()
        assert dispatcher.deliver_due(now=t0) == 2  # 503: retried; 410: failed at once
        assert dispatcher.deliver_due(now=t0 + timedelta(seconds=3)) == 1  # past the 2 s window: dead
        assert [r.action for r in down.requests] == ["503", "503"] and refusing.count() == 1
        assert store.webhook_status(dead_job.id) == "dead" and store.webhook_status(refused_job.id) == "failed"
        answer = client.post(f"/api/v6/fetch/{dead_job.id}", json={"key": user_key}).json()
        assert answer["status"] == "success" and answer["webhook_status"] == "dead"  # what clients see

        # only admin keys
        assert client.get(ADMIN_LIST, headers={"Key": user_key}).status_code == 403
        assert client.post("/api/fluxserve/webhooks/replay", json={"key": user_key}).status_code == 403
        refused = client.post("/api/fluxserve/webhooks/deliveries/1/replay", json={"key": user_key})
        assert refused.status_code == 403
        assert refused.json() == {"status": "error", "message": "This endpoint needs an admin key"}
        assert client.get(ADMIN_LIST).status_code == 401

        listing = client.get(ADMIN_LIST, headers={"Key": admin_key})
        assert listing.status_code == 200 and "receiver-token" not in listing.text and "red fox" not in listing.text
        body = listing.json()
        assert body["status"] == "ok" and body["total"] == 1 and (body["page"], body["per_page"]) == (1, 50)
        [item] = body["deliveries"]
        dead_row = delivery_for(sessions, dead_job.id)
        assert item["id"] == dead_row.id and item["job_id"] == dead_job.id and item["key_id"] == user.id
        assert item["status"] == "dead" and item["receiver"] == f"http://127.0.0.1:{down.port}"
        assert item["attempts"] == 2 and item["replays"] == 0 and "HTTP 503" in item["last_error"]
        assert item["created_at"] and item["gave_up_at"] and item["delivered_at"] is None
        both = client.get(ADMIN_LIST, params={"status": "all"}, headers={"Key": admin_key}).json()["deliveries"]
        assert [d["job_id"] for d in both] == [dead_job.id, refused_job.id]  # newest give-up first
        failed = client.get(ADMIN_LIST, params={"status": "failed"}, headers={"Key": admin_key}).json()
        assert [d["job_id"] for d in failed["deliveries"]] == [refused_job.id]
        assert failed["deliveries"][0]["last_error"].startswith("HTTP 410")
        paged = client.get(ADMIN_LIST, params={"status": "all", "per_page": 1, "page": 2},
                           headers={"Key": admin_key}).json()
        assert paged["total"] == 2 and [d["job_id"] for d in paged["deliveries"]] == [refused_job.id]
        one_job = client.get(ADMIN_LIST, params={"status": "all", "job_id": refused_job.id},
                             headers={"Key": admin_key}).json()
        assert [d["job_id"] for d in one_job["deliveries"]] == [refused_job.id]
        bad = client.get(ADMIN_LIST, params={"status": "gone"}, headers={"Key": admin_key})
        assert bad.status_code == 400 and bad.json()["status"] == "error"
        assert "fluxserve_webhook_dead_letters 1.0" in client.get("/metrics").text

        # replay: the same row, pending again with a fresh window and attempts counter
        down.default = 200
        replayed = client.post(f"/api/fluxserve/webhooks/deliveries/{dead_row.id}/replay", json={"key": admin_key})
        assert replayed.status_code == 200, replayed.text
        again = replayed.json()
        assert again["status"] == "success" and again["id"] == dead_row.id
        assert again["delivery"]["status"] == "pending" and again["delivery"]["attempts"] == 0
        assert again["delivery"]["replays"] == 1 and again["delivery"]["gave_up_at"] is None
        row = delivery_for(sessions, dead_job.id)
        assert row.give_up_at > utcnow() + timedelta(seconds=1) and row.next_attempt_at <= utcnow()
        pending = client.post(f"/api/fluxserve/webhooks/deliveries/{dead_row.id}/replay", json={"key": admin_key})
        assert pending.status_code == 409 and "is pending" in pending.json()["message"]
        assert "fluxserve_webhook_dead_letters 0.0" in client.get("/metrics").text

        assert dispatcher.deliver_due() == 1  # the refused one stays failed: only the replayed one is due
        row = delivery_for(sessions, dead_job.id)
        assert (row.status, row.attempts, row.replays) == ("delivered", 1, 1)
        assert [r.action for r in down.requests] == ["503", "503", "200"]
        assert len({r.headers["Idempotency-Key"] for r in down.requests}) == 1  # receivers can still dedupe
        last = down.requests[-1]
        assert verify(secret, last.headers["X-Fluxserve-Timestamp"], last.body, last.headers["X-Fluxserve-Signature"])
        assert json.loads(last.body)["track_id"] == "dead"
        assert store.webhook_status(dead_job.id) == "delivered"
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 2  # no row duplicated

        delivered = client.post(f"/api/fluxserve/webhooks/deliveries/{dead_row.id}/replay", json={"key": admin_key})
        assert delivered.status_code == 409
        assert delivered.json()["message"] == (f"Webhook delivery {dead_row.id} is delivered: only dead or failed "
                                               "deliveries can be replayed")
        for missing in (999, 0, -1, 10**30):
            answer = client.post(f"/api/fluxserve/webhooks/deliveries/{missing}/replay", json={"key": admin_key})
            assert answer.status_code == 404 and answer.json()["message"] == "Webhook delivery not found"

        # a failed one (refused by its receiver) can be replayed by id once it is fixed
        refusing.default = 200
        refused_id = delivery_for(sessions, refused_job.id).id
        assert client.post(f"/api/fluxserve/webhooks/deliveries/{refused_id}/replay",
                           headers={"Key": admin_key}).status_code == 200
        assert dispatcher.deliver_due() == 1 and store.webhook_status(refused_job.id) == "delivered"


def test_replaying_every_dead_letter_or_one_jobs(admin_api, make_dispatcher):
    client, sessions, user, _, admin_key = admin_api
    store = JobStore(sessions, webhook_retry_seconds=2)
    down = Receiver(free_port(), default=503)
    with receiver_running(down):
        jobs = [finished(store, user.id, down.url, track_id=f"d{i}") for i in range(3)]
        dispatcher = make_dispatcher(sessions)
        t0 = utcnow()
        assert dispatcher.deliver_due(now=t0 + timedelta(seconds=3)) == 3  # one last try each: dead
        assert {store.webhook_status(job.id) for job in jobs} == {"dead"}

        one = client.post("/api/fluxserve/webhooks/replay", json={"key": admin_key, "job_id": jobs[1].id}).json()
        assert one["status"] == "success" and one["replayed"] == [delivery_for(sessions, jobs[1].id).id]
        assert [store.webhook_status(job.id) for job in jobs] == ["dead", "pending", "dead"]
        rest = client.post("/api/fluxserve/webhooks/replay", json={"key": admin_key}).json()
        assert rest["replayed"] == [delivery_for(sessions, jobs[i].id).id for i in (0, 2)]
        assert client.post("/api/fluxserve/webhooks/replay", json={"key": admin_key}).json()["replayed"] == []
        assert client.post("/api/fluxserve/webhooks/replay", json={"key": admin_key, "job_id": 10**30}).status_code == 400
        assert client.post("/api/fluxserve/webhooks/replay", json={"key": admin_key, "job_id": "x"}).status_code == 400
        assert {store.webhook_status(job.id) for job in jobs} == {"pending"}


def test_an_attempt_from_before_a_replay_cannot_record_its_outcome(new_db, make_dispatcher):
    """The claim token, not the attempts counter (which a replay resets), guards the outcome."""
    sessions = new_db()
    key, _ = KeyStore(sessions).create("hooks")
    job = finished(JobStore(sessions), key.id, "http://127.0.0.1:9/hook")
    first, second = make_dispatcher(sessions), make_dispatcher(sessions)
    receiver = receiver_of("http://127.0.0.1:9/hook")
    stale = first._claim(delivery_for(sessions, job.id).id, 0, receiver, utcnow())  # then its process froze
    with sessions.begin() as session:  # meanwhile: its lease ran out, another try ended the row
        session.execute(text("UPDATE webhook_deliveries SET status = 'dead'"))
    WebhookDeliveries(sessions).replay(stale.id)
    current = second._claim(stale.id, 0, receiver, utcnow())
    assert current is not None and current.attempts == stale.attempts == 1  # the same count again
    first._record(stale, 1, _Result("delivered"), utcnow())  # the frozen one wakes up
    row = delivery_for(sessions, job.id)
    assert row.status == "pending" and row.claim_token == current.claim_token  # not taken for delivered
    second._record(current, 1, _Result("delivered"), utcnow())
    assert delivery_for(sessions, job.id).status == DeliveryStatus.DELIVERED.value


def test_a_delivery_table_from_the_previous_release_is_upgraded_and_delivered(tmp_path, make_dispatcher):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:  # the columns this release added, gone again
        for column in ("receiver", "claim_token", "gave_up_at", "replays"):
            connection.exec_driver_sql(f"ALTER TABLE webhook_deliveries DROP COLUMN {column}")
    engine.dispose()
    sessions = open_database(url)
    try:
        key, _ = KeyStore(sessions).create("hooks")
        receiver = Receiver(free_port())
        with receiver_running(receiver):
            job = finished(JobStore(sessions), key.id, receiver.url)
            with sessions.begin() as session:  # as the old release wrote it
                session.execute(text("UPDATE webhook_deliveries SET receiver = NULL"))
            assert make_dispatcher(sessions).deliver_due() == 1
        row = delivery_for(sessions, job.id)
        assert row.status == "delivered" and row.receiver == f"http://127.0.0.1:{receiver.port}" and row.replays == 0
    finally:
        sessions.kw["bind"].dispose()


@pytest.mark.parametrize(("url", "receiver"), [
    ("https://Hooks.Example.com/path?token=secret", "https://hooks.example.com"),
    ("https://user:pw@hooks.example.com:8443/x", "https://hooks.example.com:8443"),
    ("http://hooks.example.com:80/x", "http://hooks.example.com"),
    ("http://[2001:db8::1]:9000/x", "http://[2001:db8::1]:9000"),
    ("ftp://example.com/x", "?"), ("not a url", "?"), ("http://host:99999/", "?"),
])
def test_receiver_is_scheme_host_and_port_only(url, receiver):
    assert receiver_of(url) == receiver
