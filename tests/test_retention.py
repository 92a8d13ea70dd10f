"""Retention: expired outputs are deleted (the job row keeps its record), old unreferenced init
images and stale temp files go, nothing outside the storage roots is touched, and the janitor
thread keeps sweeping. One end-to-end test shows an expired image URL answering 404 over HTTP."""

from __future__ import annotations

import itertools
import os
import time
from datetime import timedelta

import httpx
import pytest

from fluxserve.jobs.database import open_database
from fluxserve.jobs.status import JobStatus
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.tables import utcnow
from fluxserve.keys import KeyStore
from fluxserve.retention import Janitor, SweepResult
from fluxserve.storage.local import LocalStorage
from tests.support.servers import live_server

HOUR = 3600.0
DAY = 86400.0
_prefixes = itertools.count(1)


class Env:
    def __init__(self, tmp_path):
        self.sessions = open_database(f"sqlite:///{tmp_path / 'jobs.db'}")
        self.jobs = JobStore(self.sessions)
        self.key_id = KeyStore(self.sessions).create("k")[0].id
        self.outputs = LocalStorage(tmp_path / "outputs", "http://test")
        self.inputs = LocalStorage(tmp_path / "inputs", "http://test")

    def janitor(self, **kwargs) -> Janitor:
        options = {"retention_seconds": DAY, "interval_seconds": 60.0, **kwargs}
        return Janitor(self.jobs, self.outputs, self.inputs, **options)

    def queue(self, params: dict | None = None):
        return self.jobs.create(
            key_id=self.key_id, server="flux_klein", model="flux-klein", task="text2img",
            params={"inputs": [], "input_2": None, **(params or {})}, meta={"prompt": "a cat"},
            file_prefix=f"job{next(_prefixes)}",
        )

    def succeeded(self, *, expires_at, samples: int = 2, params: dict | None = None, write: bool = True):
        """A job taken through queued -> running -> succeeded, its output files really written."""
        job = self.queue(params)
        claimed = self.jobs.claim_next()
        assert claimed is not None and claimed.id == job.id
        names = [f"{job.file_prefix}-{i}.png" for i in range(samples)]
        if write:
            for i, name in enumerate(names):
                self.outputs.save(name, b"png bytes %d" % i)
        meta = {"prompt": "a cat", "seed": 42}
        assert self.jobs.succeed(
            job.id, claimed.claim_token, outputs=names, nsfw_detected=False, generation_time=0.5,
            meta=meta, expires_at=expires_at,
        )
        return self.jobs.get(job.id)

    def exists(self, job) -> list[bool]:
        return [(self.outputs.root / name).exists() for name in job.outputs]


def age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


@pytest.fixture
def env(tmp_path):
    env = Env(tmp_path)
    yield env
    env.sessions.kw["bind"].dispose()


def test_expired_outputs_are_deleted_and_the_row_keeps_its_record(env):
    now = utcnow()
    expired = env.succeeded(expires_at=now - timedelta(seconds=1))
    later = env.succeeded(expires_at=now + timedelta(hours=1))
    forever = env.succeeded(expires_at=None)  # e.g. kept in S3: never expires here
    assert env.exists(expired) == env.exists(later) == env.exists(forever) == [True, True]
    janitor = env.janitor()

    result = janitor.sweep()

    assert result == SweepResult(jobs_expired=1, files_deleted=2, inputs_deleted=0, temp_files_deleted=0)
    assert env.exists(expired) == [False, False]
    assert env.exists(later) == env.exists(forever) == [True, True]
    row = env.jobs.get(expired.id)
    assert row.status == JobStatus.SUCCEEDED.value
    assert row.outputs == expired.outputs and row.meta == {"prompt": "a cat", "seed": 42}
    assert row.expired_at is not None and row.expired_at >= now
    assert env.jobs.get(later.id).expired_at is None

    assert not janitor.sweep()  # a second sweep is a no-op

    # much later: the second job goes too, the one without expires_at never does
    result = janitor.sweep(now + timedelta(days=365))
    assert (result.jobs_expired, result.files_deleted) == (1, 2)
    assert env.exists(later) == [False, False] and env.exists(forever) == [True, True]
    assert env.jobs.get(forever.id).expired_at is None
    assert not janitor.sweep(now + timedelta(days=365))


def test_missing_files_are_fine_and_many_jobs_expire_in_one_sweep(env):
    past = utcnow() - timedelta(minutes=5)
    gone = env.succeeded(expires_at=past, write=False)  # files already missing (a crash, a manual rm)
    many = [env.succeeded(expires_at=past, samples=1) for _ in range(7)]

    janitor = env.janitor()
    original = env.jobs.due_for_expiry
    env.jobs.due_for_expiry = lambda now=None, limit=3: original(now, limit=3)  # force several pages
    result = janitor.sweep()

    assert (result.jobs_expired, result.files_deleted) == (8, 7)
    assert env.jobs.get(gone.id).expired_at is not None
    assert all(env.exists(job) == [False] for job in many)
    assert list(env.outputs.root.iterdir()) == []


def test_on_deleted_is_called_per_expired_job_and_its_errors_do_not_stop_the_sweep(env):
    past = utcnow() - timedelta(seconds=1)
    first, second = env.succeeded(expires_at=past), env.succeeded(expires_at=past)
    called = []

    def on_deleted(job_id):
        called.append(job_id)
        raise RuntimeError("listener broke")

    assert env.janitor(on_deleted=on_deleted).sweep().jobs_expired == 2
    assert called == [first.id, second.id]


def test_unsafe_output_names_never_touch_files_outside_the_root(env, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not ours")
    job = env.queue()
    claimed = env.jobs.claim_next()
    env.jobs.succeed(
        job.id, claimed.claim_token, outputs=["../outside.png", str(outside), "sub/x.png"], nsfw_detected=False,
        generation_time=0.1, meta={}, expires_at=utcnow() - timedelta(seconds=1),
    )
    # a link inside the root pointing out: removing it removes the link, never the target
    linked = env.succeeded(expires_at=utcnow() - timedelta(seconds=1), samples=1, write=False)
    (env.outputs.root / linked.outputs[0]).symlink_to(outside)

    result = env.janitor().sweep()

    assert result.jobs_expired == 2 and result.files_deleted == 1
    assert outside.read_bytes() == b"not ours"
    assert not (env.outputs.root / linked.outputs[0]).is_symlink()


def test_inputs_and_temp_files(env, tmp_path):
    def stored(name: str, old: bool) -> str:
        env.inputs.save(name, name.encode())
        if old:
            age(env.inputs.root / name, DAY + 60)
        return name

    queued_input = stored("a" * 64 + ".png", old=True)
    running_input = stored("b" * 64 + ".png", old=True)
    old_unused = stored("c" * 64 + ".png", old=True)
    fresh_unused = stored("d" * 64 + ".png", old=False)
    finished_input = stored("e" * 64 + ".png", old=True)

    # a running job (input_2) and a queued job (inputs) still need theirs; a finished one does not
    env.succeeded(expires_at=None, params={"inputs": [finished_input]})
    env.queue({"inputs": [], "input_2": running_input})
    assert env.jobs.claim_next().params["input_2"] == running_input
    env.queue({"inputs": [queued_input]})

    # leftovers of interrupted atomic writes, in both folders; a fresh one may be a write in progress
    old_temps = [env.inputs.root / ".tmp-abc123", env.outputs.root / ".tmp-def456"]
    fresh_temp = env.outputs.root / ".tmp-ghi789"
    for path in [*old_temps, fresh_temp]:
        path.write_bytes(b"partial")
    for path in old_temps:
        age(path, HOUR + 60)

    # things the janitor must leave alone: a folder, and a symlink (old) pointing outside the root
    outside = tmp_path / "precious.png"
    outside.write_bytes(b"precious")
    link = env.inputs.root / ("f" * 64 + ".png")
    link.symlink_to(outside)
    age(link, DAY + 60)
    (env.inputs.root / "folder").mkdir()
    age(env.inputs.root / "folder", DAY + 60)

    janitor = env.janitor()
    result = janitor.sweep()

    assert result == SweepResult(jobs_expired=0, files_deleted=0, inputs_deleted=2, temp_files_deleted=2)
    left = {path.name for path in env.inputs.root.iterdir()}
    assert left == {queued_input, running_input, fresh_unused, link.name, "folder"}
    assert old_unused not in left and finished_input not in left
    assert not any(path.exists() for path in old_temps) and fresh_temp.exists()
    assert outside.read_bytes() == b"precious" and link.is_symlink()

    assert not janitor.sweep()  # a second sweep is a no-op

    # the retention period is configurable: a shorter one takes the fresh input too
    age(env.inputs.root / fresh_unused, 120)
    assert env.janitor(retention_seconds=60).sweep().inputs_deleted == 1
    assert {path.name for path in env.inputs.root.iterdir()} == {queued_input, running_input, link.name, "folder"}


def test_the_thread_sweeps_repeatedly_survives_errors_and_stops_promptly(env):
    janitor = env.janitor(interval_seconds=0.05)
    failures = []
    original = env.jobs.due_for_expiry

    def flaky(now=None, limit=200):
        if not failures:
            failures.append(now)
            raise RuntimeError("database went away")
        return original(now, limit)

    env.jobs.due_for_expiry = flaky
    janitor.start()
    try:
        janitor.start()  # idempotent
        job = env.succeeded(expires_at=utcnow() - timedelta(seconds=1), samples=1)
        path = env.outputs.root / job.outputs[0]
        deadline = time.monotonic() + 5
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not path.exists(), "the janitor thread did not delete the expired file"
        assert failures, "the first sweep should have failed (and been survived)"
        # and it keeps going: a job expiring later is picked up by a later sweep
        second = env.succeeded(expires_at=utcnow() + timedelta(seconds=0.3), samples=1)
        second_path = env.outputs.root / second.outputs[0]
        deadline = time.monotonic() + 5
        while second_path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not second_path.exists()
    finally:
        started = time.monotonic()
        janitor.stop()
        assert time.monotonic() - started < 2
    assert janitor._thread is None
    janitor.stop()  # stopping twice is fine


def test_expired_image_urls_answer_404_over_http(tmp_path, tiny_root):
    """End to end: with retention 1 s, a generated image is served, then answers 404 with a
    ModelsLab error body; fetch still knows the request."""
    with live_server(tmp_path / "server", tiny_root, retention_seconds=4, janitor_interval_seconds=0.2) as live:
        with live.client() as http:
            body = {"key": live.key, "prompt": "x", "width": 256, "height": 256, "num_inference_steps": 1}
            result = http.post("/api/v1/enterprise/flux_klein/text2img", json=body).json()
            job_id = result["id"]
            deadline = time.monotonic() + 60
            while result["status"] == "processing" and time.monotonic() < deadline:
                time.sleep(0.2)
                result = http.post(f"/api/v1/enterprise/flux_klein/fetch/{job_id}", json={"key": live.key}).json()
            assert result["status"] == "success", result
            url = result["output"][0]
            first = http.get(url)
            assert first.status_code == 200 and first.headers["content-type"] == "image/png"
            assert live.jobs.get(job_id).expires_at is not None, "the worker does not set expires_at yet"

            deadline = time.monotonic() + 20
            answer: httpx.Response = first
            while time.monotonic() < deadline:
                answer = http.get(url)
                if answer.status_code == 404:
                    break
                time.sleep(0.2)
            assert answer.status_code == 404, "the image was not expired within 60 s"
            assert answer.json()["status"] == "error"

            assert live.jobs.get(job_id).expired_at is not None
            fetched = http.post(f"/api/v1/enterprise/flux_klein/fetch/{job_id}", json={"key": live.key})
            assert fetched.status_code == 200, fetched.text  # the request is still known
            payload = fetched.json()
            assert payload["id"] == job_id and payload["status"] == "success"
            assert payload["output"] == [] and payload["meta"] == result["meta"]
