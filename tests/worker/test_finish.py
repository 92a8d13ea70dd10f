"""worker.finish: the safety check, PNGs, local and remote storage, the one write that records
the outcome, failure messages, and the finisher thread."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from fluxserve.engine.errors import JobAborted, ModelLoadError
from fluxserve.jobs.tables import utcnow
from fluxserve.storage.configs import StorageUnavailable
from fluxserve.storage.s3 import UploadError
from fluxserve.worker.finish import OOM_MESSAGE, FinisherThread, ResultWriter
from fluxserve.worker.messages import Outcome
from fluxserve.worker.prepare import Preparer
from tests.support.waiting import wait_until
from tests.worker.conftest import (
    FakeOutOfMemory,
    FakeRemote,
    FakeSafety,
    FakeStorageConfigs,
    deliveries,
    job_row,
    png_colours,
    seed_colour,
    steal_claim,
)

HOOK = "https://client.example/hook"
REMOTE = {"config_id": None, "public_url": "https://bucket.example/images"}
BLACK = (0, 0, 0)


@pytest.fixture
def writers(store, outputs, engine):
    made = []

    def make(safety=None, storage_configs=None, retention_seconds=600.0) -> ResultWriter:
        writer = ResultWriter(store, outputs, safety or FakeSafety(), engine, storage_configs, retention_seconds)
        made.append(writer)
        return writer

    yield make
    for writer in made:
        writer.close()


@pytest.fixture
def claimed(store, registry, inputs, engine, make_job):
    """Queue a job, claim it, prepare it, generate its images: (prepared, images)."""

    def make(prompt="a cat", *, webhook=None, track_id=None, **params):
        job = make_job(prompt, webhook=webhook, track_id=track_id, **params)
        running = store.claim_next()
        assert running.id == job.id
        prepared = Preparer(registry, inputs, engine).prepare(running)
        return prepared, engine.images(prepared.params)

    return make


# -- succeed ------------------------------------------------------------------------------------
def test_succeed_stores_pngs_and_records_the_job(writers, claimed, store, outputs, sessions):
    prepared, images = claimed(seeds=[1, 2], webhook=HOOK, track_id="t")
    writer = writers(retention_seconds=120)
    generation_time = writer.succeed(prepared, images, time.perf_counter())
    assert generation_time is not None and generation_time >= 0
    row = job_row(store, prepared.job.id)
    assert row.status == "succeeded" and row.generation_time == pytest.approx(generation_time)
    assert [png_colours(outputs, name) for name in row.outputs] == [{seed_colour(1)}, {seed_colour(2)}]
    assert timedelta(seconds=110) < row.expires_at - utcnow() <= timedelta(seconds=120)
    (delivery,) = deliveries(sessions, row.id)
    assert delivery.payload["output"] == [outputs.url_for(name) for name in row.outputs]


def test_a_flagged_image_is_stored_as_the_blank(writers, claimed, store, outputs, sessions, engine):
    prepared, images = claimed(seeds=[1, 2, 3], webhook=HOOK)
    safety = FakeSafety(flagged={2})
    assert writers(safety=safety).succeed(prepared, images, time.perf_counter()) is not None
    assert safety.calls == 1
    row = job_row(store, prepared.job.id)
    assert [png_colours(outputs, name) for name in row.outputs] == [{seed_colour(1)}, {BLACK}, {seed_colour(3)}]
    assert row.meta["nsfw_scores"] == [0.0, 1.0, 0.0]
    assert row.nsfw_detected is True
    (delivery,) = deliveries(sessions, row.id)
    assert delivery.payload["nsfw_content_detected"] is True
    assert delivery.payload["meta"]["nsfw_scores"] == [0.0, 1.0, 0.0]


def test_safety_checker_off_skips_the_check(writers, claimed, store, outputs):
    prepared, images = claimed(seeds=[2], safety_checker=False)
    safety = FakeSafety(flagged={2})  # would flag it
    assert writers(safety=safety).succeed(prepared, images, time.perf_counter()) is not None
    assert safety.calls == 0
    row = job_row(store, prepared.job.id)
    assert "nsfw_scores" not in row.meta and row.nsfw_detected is False
    assert png_colours(outputs, row.outputs[0]) == {seed_colour(2)}


def test_remote_storage_urls_become_the_jobs_output_urls(writers, claimed, store, outputs, sessions):
    prepared, images = claimed(seeds=[1, 2], remote=REMOTE, webhook=HOOK)
    configs = FakeStorageConfigs()
    assert writers(storage_configs=configs).succeed(prepared, images, time.perf_counter()) is not None
    row = job_row(store, prepared.job.id)
    urls = [f"https://bucket.example/images/{name}" for name in row.outputs]
    assert configs.asked == [REMOTE]
    assert row.output_urls == urls
    # the bucket got the very bytes kept on local disk, as PNG
    assert {name: saved for name, (saved, _) in configs.remote.saved.items()} == {
        name: outputs.read(name) for name in row.outputs}
    assert all(content_type == "image/png" for _, content_type in configs.remote.saved.values())
    (delivery,) = deliveries(sessions, row.id)
    assert delivery.payload["output"] == urls and delivery.payload["proxy_links"] == urls


@pytest.mark.parametrize("configs", [
    FakeStorageConfigs(remote=FakeRemote("https://b.example", UploadError(
        "Upload failed: bucket 'b' refused key 'x.png' (AccessDenied)"))),
    FakeStorageConfigs(error=StorageUnavailable(
        "Upload failed: the S3 details were removed (reset_s3) before the images were uploaded")),
], ids=["upload-error", "storage-unavailable"])
def test_a_remote_storage_failure_fails_the_job_with_its_message(writers, claimed, store, sessions, configs):
    prepared, images = claimed(remote=REMOTE, webhook=HOOK, track_id="t")
    writer = writers(storage_configs=configs)
    outcome = writer.guarded(prepared.job, lambda: writer.succeed(prepared, images, time.perf_counter()))
    assert outcome == (Outcome.FAILED, None)
    row = job_row(store, prepared.job.id)
    expected = str(configs.error or configs.remote.error)
    assert row.status == "failed" and row.error == expected  # the safe text, as it was written
    assert row.output_urls is None
    (delivery,) = deliveries(sessions, row.id)
    assert delivery.payload == {"status": "failed", "id": row.id, "message": expected, "track_id": "t"}


def test_remote_without_storage_configs_fails_with_storage_unavailable(writers, claimed, store):
    prepared, images = claimed(remote=REMOTE)
    writer = writers(storage_configs=None)
    outcome = writer.guarded(prepared.job, lambda: writer.succeed(prepared, images, time.perf_counter()))
    assert outcome == (Outcome.FAILED, None)
    assert job_row(store, prepared.job.id).error == "Upload failed: this worker has no S3 support configured"


def test_a_finish_whose_claim_was_lost_is_lost_and_records_nothing(writers, claimed, store, sessions):
    prepared, images = claimed(webhook=HOOK)
    new_token = steal_claim(sessions, prepared.job.id)
    writer = writers()
    outcome = writer.guarded(prepared.job, lambda: writer.succeed(prepared, images, time.perf_counter()))
    assert outcome == (Outcome.LOST, None)
    row = job_row(store, prepared.job.id)
    assert row.status == "running" and row.claim_token == new_token and row.outputs == []
    assert deliveries(sessions, row.id) == []


def test_a_store_write_answering_false_is_lost(writers, claimed, store, monkeypatch):
    prepared, images = claimed()
    monkeypatch.setattr(store, "succeed", lambda *args, **kwargs: False)
    writer = writers()
    assert writer.guarded(prepared.job, lambda: writer.succeed(prepared, images, time.perf_counter())) == (
        Outcome.LOST, None)


# -- fail and its messages ------------------------------------------------------------------------
@pytest.mark.parametrize("error, message", [
    (ValueError("bad value"), "Generation failed: ValueError: bad value"),
    (ModelLoadError("flux-klein could not be loaded: no weights; run fluxserve download"),
     "flux-klein could not be loaded: no weights; run fluxserve download"),
    (UploadError("Upload failed: bucket 'b' said no"), "Upload failed: bucket 'b' said no"),
    (FakeOutOfMemory("CUDA out of memory. Tried to allocate 80 GiB"), OOM_MESSAGE),
], ids=["generic", "model-load", "upload", "oom"])
def test_fail_records_the_clients_message(writers, claimed, store, engine, error, message):
    prepared, _ = claimed()
    assert writers().fail(prepared.job, error) == (Outcome.FAILED, None)
    row = job_row(store, prepared.job.id)
    assert row.status == "failed" and row.error == message
    assert engine.released == (1 if isinstance(error, FakeOutOfMemory) else 0)


def test_fail_with_job_aborted_is_lost_and_records_nothing(writers, claimed, store, sessions):
    prepared, _ = claimed(webhook=HOOK)
    assert writers().fail(prepared.job, JobAborted("claim lost")) == (Outcome.LOST, None)
    row = job_row(store, prepared.job.id)
    assert row.status == "running" and row.error is None and deliveries(sessions, row.id) == []


def test_guarded_turns_any_exception_into_the_jobs_failure(writers, claimed, store):
    prepared, _ = claimed()

    def explode():
        raise KeyError("missing")

    assert writers().guarded(prepared.job, explode) == (Outcome.FAILED, None)
    assert job_row(store, prepared.job.id).error == "Generation failed: KeyError: 'missing'"


# -- the finisher thread ----------------------------------------------------------------------------
def test_the_finisher_runs_tasks_in_order_survives_a_failing_one_and_close_drains():
    finisher = FinisherThread()
    done: list[int] = []

    def task(i):
        def run():
            time.sleep(0.005)
            if i == 2:
                raise RuntimeError("this task fails")
            done.append(i)
        return run

    for i in range(6):
        finisher.put(task(i))
    finisher.close()  # returns once every task handed over has run
    assert done == [0, 1, 3, 4, 5]
    assert not finisher._thread.is_alive()


def test_at_most_one_task_waits_behind_the_one_running():
    finisher = FinisherThread()
    release, started = threading.Event(), threading.Event()
    order: list[str] = []

    def blocker():
        started.set()
        release.wait(5)
        order.append("first")

    finisher.put(blocker)
    started.wait(5)
    finisher.put(lambda: order.append("second"))  # waits in the queue
    third_handed = threading.Event()

    def hand_third():
        finisher.put(lambda: order.append("third"))
        third_handed.set()

    threading.Thread(target=hand_third, daemon=True).start()
    assert not third_handed.wait(0.2)  # put blocks: the generator does not run ahead of the finisher
    release.set()
    wait_until(third_handed.is_set, 5, "the third task to be handed over")
    finisher.close()
    assert order == ["first", "second", "third"]
