"""Waiting in tests: for a condition, or for a job to leave "processing"."""

from __future__ import annotations

import time
from typing import Any

import httpx

FETCH = "/api/v6/images/fetch/{id}"
KLEIN_FETCH = "/api/v1/enterprise/flux_klein/fetch/{id}"


def wait_until(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def wait_for_job(client: httpx.Client, key: str, job_id: int, timeout: float = 60.0,
                 fetch: str = FETCH) -> httpx.Response:
    """The fetch answer once job ``job_id`` is no longer "processing"."""
    def finished():
        answer = client.post(fetch.format(id=job_id), json={"key": key})
        if answer.status_code == 429:  # polled past the per-key rate limit (a slow machine): poll on
            return None
        return answer if answer.json()["status"] != "processing" else None

    return wait_until(finished, timeout, f"job {job_id} to finish")
