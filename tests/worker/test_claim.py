"""worker.claim: heartbeats (with progress) from a side thread, and the end of a lost claim."""

from __future__ import annotations

import time

import pytest

from fluxserve.engine.errors import JobAborted
from fluxserve.worker.claim import Claim
from tests.support.waiting import wait_until
from tests.worker.conftest import job_row, steal_claim


@pytest.fixture
def claimed(store, make_job):
    make_job()
    return store.claim_next()


@pytest.fixture
def claims():
    made = []

    def make(*args, **kwargs) -> Claim:
        claim = Claim(*args, **kwargs).start()
        made.append(claim)
        return claim

    yield make
    for claim in made:
        claim.stop()


def test_heartbeats_move_heartbeat_at_and_record_progress(store, claimed, claims):
    first_beat = job_row(store, claimed.id).heartbeat_at
    claim = claims(store, claimed, every=0.05)
    claim.progress(3, 10)
    row = wait_until(lambda: (r := job_row(store, claimed.id)).progress_step == 3 and r, 5, "progress 3/10")
    assert row.progress_total == 10 and row.heartbeat_at > first_beat
    claim.progress(7, 10)
    row = wait_until(lambda: (r := job_row(store, claimed.id)).progress_step == 7 and r, 5, "progress 7/10")
    assert row.status == "running" and row.claim_token == claimed.claim_token


def test_a_step_is_written_soon_even_with_a_long_heartbeat_period(store, claimed, claims):
    """Progress streams see each step: a new step beats within a quarter second, not `every`."""
    claim = claims(store, claimed, every=60.0)
    claim.progress(1, 4)
    wait_until(lambda: job_row(store, claimed.id).progress_step == 1, 2, "the step to be written")
    beat = job_row(store, claimed.id).heartbeat_at
    time.sleep(0.6)  # nothing new: no write until the period is up
    assert job_row(store, claimed.id).heartbeat_at == beat


def test_progress_raises_job_aborted_once_the_store_says_the_claim_is_lost(store, claimed, claims, monkeypatch):
    beats = []

    def heartbeat(*args, **kwargs):
        beats.append(args)
        return False

    monkeypatch.setattr(store, "heartbeat", heartbeat)
    claim = claims(store, claimed, every=0.05)
    claim.progress(1, 4)  # not known yet: no error
    wait_until(claim.lost.is_set, 5, "the claim to be lost")
    with pytest.raises(JobAborted):
        claim.progress(2, 4)
    claim._thread.join(2)
    assert not claim._thread.is_alive()  # a lost claim stops beating by itself
    assert len(beats) == 1


def test_a_claim_taken_over_in_the_store_is_lost(store, sessions, claimed, claims):
    claim = claims(store, claimed, every=0.05)
    new_token = steal_claim(sessions, claimed.id)
    wait_until(claim.lost.is_set, 5, "the claim to be lost")
    with pytest.raises(JobAborted):
        claim.progress(1, 1)
    assert job_row(store, claimed.id).claim_token == new_token  # the old claim wrote nothing


def test_a_failing_heartbeat_is_retried(store, claimed, claims, monkeypatch):
    real, failures = store.heartbeat, []

    def flaky(*args, **kwargs):
        if len(failures) < 2:
            failures.append(True)
            raise RuntimeError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "heartbeat", flaky)
    claim = claims(store, claimed, every=0.05)
    claim.progress(2, 5)
    wait_until(lambda: job_row(store, claimed.id).progress_step == 2, 5, "a beat after the failures")
    assert len(failures) == 2 and not claim.lost.is_set()


def test_stop_joins_the_heartbeat_thread_and_beating_stops(store, claimed):
    claim = Claim(store, claimed, every=0.05).start()
    wait_until(lambda: job_row(store, claimed.id).heartbeat_at > claimed.heartbeat_at, 5, "a beat")
    claim.stop()
    assert not claim._thread.is_alive()
    beat = job_row(store, claimed.id).heartbeat_at
    claim.progress(9, 9)  # after stop: recorded locally, never written
    time.sleep(0.3)
    assert job_row(store, claimed.id).heartbeat_at == beat and job_row(store, claimed.id).progress_step == 0
