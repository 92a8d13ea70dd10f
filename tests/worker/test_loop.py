"""worker.loop: claiming, generating through the Engine protocol, batches, commands, status,
stale-job recovery and lost claims, on a real job store with a fake engine."""

from __future__ import annotations

import inspect
import queue
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from PIL import Image
from sqlalchemy import update

from fluxserve.dependencies import Dependency
from fluxserve.jobs.tables import Job, utcnow
from fluxserve.models import Registry
from fluxserve.params import JobParams
from fluxserve.worker import WorkerConfig
from fluxserve.worker.finish import OOM_MESSAGE
from fluxserve.worker.loop import Engine
from fluxserve.worker.messages import Command, JobFinished, JobStarted, Outcome, StatusReport
from tests.support.waiting import wait_until
from tests.worker.conftest import (
    SIZE,
    FakeEngine,
    FakeOutOfMemory,
    deliveries,
    finish,
    job_row,
    png_colours,
    running,
    seed_colour,
    steal_claim,
    wait_finished,
)

HOOK = "https://client.example/hook"
KLEIN_PIPELINE = Registry.build().get("flux-klein").pipeline_key  # how Engine.loaded() names its pipeline
CONTRACT_FIELDS = {"status", "id", "output", "proxy_links", "generationTime", "nsfw_content_detected", "meta",
                   "track_id"}


# -- the seam itself ------------------------------------------------------------------------------
def test_the_worker_package_imports_no_torch():
    """The engine comes in through loop.Engine: importing the worker loads no torch (the
    existing boundary test imports the worker together with the engine, so it can't tell)."""
    code = "import sys, fluxserve.worker; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    assert "fluxserve" in loaded
    assert not loaded & {"torch", "diffusers", "transformers"}


def _protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(Engine).items()
            if callable(member) and not name.startswith("_")}


def test_the_fake_engine_and_the_production_engine_both_have_the_protocols_methods():
    from fluxserve.engine.runner import Engine as ProductionEngine

    methods = _protocol_methods()
    assert {"generate", "generate_batch", "load", "status", "is_out_of_memory"} <= set(methods)
    for implementation in (FakeEngine, ProductionEngine):
        for name, signature in methods.items():
            assert callable(getattr(implementation, name, None)), f"{implementation.__module__} lacks {name}"
            theirs = inspect.signature(getattr(implementation, name))
            wanted = [p for p in signature.parameters if p != "self"]
            assert [p for p in theirs.parameters if p != "self"] == wanted, (implementation, name)
        assert hasattr(implementation, "device")
    assert "device" in vars(Engine) or "device" in getattr(Engine, "__annotations__", {})


# -- one job ------------------------------------------------------------------------------------
def test_a_queued_job_is_claimed_generated_finished_and_reported(make_worker, make_job, store, sessions, engine,
                                                                 sink, outputs):
    job = make_job("a red fox", seeds=[3, 4], webhook=HOOK, track_id="track-1")
    worker = make_worker()
    with running(worker):
        (row,) = wait_finished(store, job.id)
    # generated through the engine with the job's params, after loading its model
    assert len(engine.calls) == 1
    call = engine.calls[0]
    assert call.spec == "flux-klein" and engine.loads == ["flux-klein"]
    assert call.params == JobParams.from_dict(job.params)
    assert call.inputs.references == [] and call.inputs.mask is None and call.inputs.second is None
    # recorded once, with the job's output names, as PNG files of the generated images
    assert row.status == "succeeded" and row.error is None and row.claim_token is None
    assert row.outputs == job.output_names() == [f"{job.file_prefix}-0.png", f"{job.file_prefix}-1.png"]
    for name, seed in zip(row.outputs, [3, 4]):
        assert png_colours(outputs, name) == {seed_colour(seed)}
    assert row.output_urls is None  # local disk only
    assert row.nsfw_detected is False and row.meta["nsfw_scores"] == [0.0, 0.0]
    assert row.meta["prompt"] == "a red fox"
    assert row.generation_time is not None and row.generation_time >= 0
    assert timedelta(seconds=590) < row.expires_at - row.finished_at < timedelta(seconds=610)
    # the webhook row, written in the same transaction, carries the contract's fields
    (delivery,) = deliveries(sessions, job.id)
    assert delivery.url == HOOK and delivery.status == "pending"
    payload = delivery.payload
    assert set(payload) == CONTRACT_FIELDS
    links = [outputs.url_for(name) for name in row.outputs]
    assert payload["status"] == "success" and payload["id"] == job.id
    assert payload["output"] == links and payload["proxy_links"] == links
    assert payload["track_id"] == "track-1" and payload["nsfw_content_detected"] is False
    assert payload["meta"] == row.meta
    assert payload["generationTime"] == pytest.approx(row.generation_time, abs=1e-3)
    # reports: status at start, then started, then finished (succeeded)
    reports = [r for r in sink.reports if not isinstance(r, StatusReport)]
    assert [type(r) for r in reports] == [JobStarted, JobFinished]
    started, finished = reports
    assert started.job_id == job.id and isinstance(started.token, str) and len(started.token) == 36
    assert finished.job_id == job.id and finished.outcome is Outcome.SUCCEEDED
    assert finished.generation_time == pytest.approx(row.generation_time)
    assert finished.queue_time >= 0
    assert isinstance(sink.reports[0], StatusReport)


def test_a_job_without_a_webhook_gets_no_delivery_row(make_worker, make_job, store, sessions):
    job = make_job()
    worker = make_worker()
    with running(worker):
        (row,) = wait_finished(store, job.id)
    assert row.status == "succeeded" and deliveries(sessions, job.id) == []


def test_the_jobs_stored_inputs_reach_the_engine(make_worker, make_job, store, engine, inputs):
    buffer = Image.new("RGB", (SIZE, SIZE), (10, 200, 30))
    buffer.save(inputs.path_for("in-0.png"))
    Image.new("L", (SIZE, SIZE), 255).save(inputs.path_for("mask-0.png"))
    job = make_job("repaint", task="inpaint", inputs=["in-0.png"], mask="mask-0.png", strength=0.8)
    worker = make_worker()
    with running(worker):
        (row,) = wait_finished(store, job.id)
    assert row.status == "succeeded"
    (call,) = engine.calls
    assert call.params.task == "inpaint" and call.params.strength == 0.8
    assert [image.getpixel((0, 0)) for image in call.inputs.references] == [(10, 200, 30)]
    assert call.inputs.mask.mode == "L" and call.inputs.mask.getpixel((0, 0)) == 255


def test_a_generation_error_fails_only_that_job_and_the_next_one_runs(make_worker, make_job, store, sessions,
                                                                      engine, sink):
    engine.fail_on["bad"] = ValueError("the pipeline broke")
    bad = make_job("bad", webhook=HOOK, track_id="t-bad")
    good = make_job("good")
    worker = make_worker()
    with running(worker):
        bad_row, good_row = wait_finished(store, bad.id, good.id)
    assert bad_row.status == "failed"
    assert bad_row.error == "Generation failed: ValueError: the pipeline broke"
    assert bad_row.outputs == [] and bad_row.claim_token is None
    assert good_row.status == "succeeded" and len(good_row.outputs) == 1
    assert engine.released == 0  # not an out-of-memory error
    (delivery,) = deliveries(sessions, bad.id)  # the failure webhook
    assert delivery.payload == {"status": "failed", "id": bad.id, "message": bad_row.error, "track_id": "t-bad"}
    assert [(f.job_id, f.outcome) for f in sink.finished()] == [(bad.id, Outcome.FAILED), (good.id, Outcome.SUCCEEDED)]
    assert sink.finished(bad.id)[0].generation_time is None


def test_a_job_that_cannot_be_prepared_fails_without_reaching_the_engine(make_worker, make_job, store, engine):
    job = make_job("img2img", task="img2img", inputs=["missing.png"])
    worker = make_worker()
    with running(worker):
        (row,) = wait_finished(store, job.id)
    assert row.status == "failed" and row.error.startswith("Generation failed: FileNotFoundError: ")
    assert engine.calls == []


def test_out_of_memory_gives_its_message_and_releases_memory(make_worker, make_job, store, engine, sink):
    engine.fail_on["huge"] = FakeOutOfMemory("CUDA out of memory. Tried to allocate 80.00 GiB")
    huge, fine = make_job("huge"), make_job("fine")
    worker = make_worker()
    with running(worker):
        huge_row, fine_row = wait_finished(store, huge.id, fine.id)
    assert huge_row.status == "failed" and huge_row.error == OOM_MESSAGE
    assert "80.00 GiB" not in huge_row.error
    assert engine.released == 1
    assert fine_row.status == "succeeded"
    assert sink.finished(huge.id)[0].outcome is Outcome.FAILED


# -- commands and status ------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [Command.STOP, "stop"])
def test_stop_ends_run_and_closes_the_finisher(make_worker, stop):
    commands: queue.Queue = queue.Queue()
    worker = make_worker(commands=commands)
    commands.put(stop)
    worker.run()  # returns: would hang (and time out) if STOP were ignored
    assert not worker._finisher._thread.is_alive()


def test_stop_lets_the_job_in_hand_finish(make_worker, make_job, store, engine):
    engine.steps, engine.step_seconds = 3, 0.02
    jobs = [make_job(f"job {i}") for i in range(3)]
    commands: queue.Queue = queue.Queue()
    worker = make_worker(commands=commands)
    engine.during_generate = lambda params: commands.put(Command.STOP)  # told to stop during the first job
    worker.run()
    rows = [job_row(store, job.id) for job in jobs]
    assert [row.status for row in rows] == ["succeeded", "queued", "queued"]


@pytest.mark.parametrize("clear", [Command.CLEAR_CACHE, "clear_cache"])
def test_clear_cache_clears_the_engine_and_reports_status(make_worker, make_job, store, engine, sink, clear):
    job = make_job()
    worker = make_worker()
    with running(worker):
        wait_finished(store, job.id)
        wait_until(lambda: sink.statuses() and sink.statuses()[-1].models_loaded == [KLEIN_PIPELINE], 5, "status")
        before = len(sink.statuses())
        worker.commands.put(clear)
        wait_until(lambda: engine.cleared == 1, 5, "the engine to be cleared")
        wait_until(lambda: len(sink.statuses()) > before, 5, "a status report after clearing")
    assert sink.statuses()[before].models_loaded == []  # the report after clearing shows it
    assert sink.statuses()[before].device == "fake"


@pytest.mark.parametrize("status", [Command.STATUS, "status"])
def test_status_command_reports_the_engines_status(make_worker, engine, sink, status):
    commands: queue.Queue = queue.Queue()
    worker = make_worker(commands=commands, config=WorkerConfig(idle_poll_seconds=0.02))
    commands.put(status)
    commands.put(Command.STOP)
    worker.run()
    reports = sink.statuses()
    assert len(reports) == 2  # one at start, one for the command
    assert reports[-1] == StatusReport(models_loaded=[], device="fake", gpu_memory={"allocated_bytes": 1})


@pytest.mark.parametrize("wake", [Command.WAKE, "wake"])
def test_wake_makes_an_idle_worker_look_at_the_queue_now(make_worker, make_job, store, engine, wake):
    """With a long idle poll, a job queued meanwhile waits for WAKE, and WAKE is enough."""
    worker = make_worker(config=WorkerConfig(heartbeat_seconds=0.05, idle_poll_seconds=30.0))
    with running(worker):
        wait_until(lambda: engine.status_calls >= 1, 5, "the worker to start")  # it is now waiting
        job = make_job()
        worker.commands.put(wake)
        (row,) = wait_finished(store, job.id, timeout=5)
    assert row.status == "succeeded"


def test_a_job_that_loads_a_model_is_followed_by_a_status_report_even_while_busy(make_worker, make_job, engine,
                                                                                  sink):
    """The models changed: reported right after the job, not only once the worker is idle."""
    gate = threading.Event()
    engine.during_generate = lambda params: gate.wait(5) if params.prompt == "slow" else None
    make_job("first"), make_job("slow")
    worker = make_worker()
    try:
        with running(worker):
            wait_until(lambda: len(engine.calls) == 2, 5, "the second job to be generating")
            wait_until(lambda: sink.statuses()[-1].models_loaded == [KLEIN_PIPELINE], 2, "a status naming the model")
            assert not gate.is_set()  # reported while the worker was busy with the next job
            gate.set()
    finally:
        gate.set()
    assert sink.statuses()[0].models_loaded == []  # the report at start


def test_status_is_reported_once_idle_after_jobs_that_changed_nothing(make_worker, make_job, store, sink):
    worker = make_worker()
    with running(worker):
        wait_finished(store, make_job("first").id)
        wait_until(lambda: sink.statuses()[-1].models_loaded == [KLEIN_PIPELINE], 5, "the report after loading")
        time.sleep(0.1)
        before = len(sink.statuses())
        wait_finished(store, make_job("second").id)  # same model: nothing changed
        wait_until(lambda: len(sink.statuses()) > before, 5, "a report once the worker is idle")


# -- batches ------------------------------------------------------------------------------------
def test_compatible_jobs_share_one_generate_batch_call(make_worker, make_job, store, engine, sink, outputs):
    a1 = make_job("a1", seeds=[1], batch_key="k")
    other = make_job("other", seeds=[9], batch_key="j")  # not compatible: runs on its own
    a2 = make_job("a2", seeds=[2, 3], batch_key="k")
    a3 = make_job("a3", seeds=[4], batch_key="k")
    a4 = make_job("a4", seeds=[5], batch_key="k")  # over max_batch_size: the next batch (alone)
    worker = make_worker(config=WorkerConfig(max_batch_size=3, heartbeat_seconds=0.05, idle_poll_seconds=0.02))
    with running(worker):
        rows = wait_finished(store, a1.id, other.id, a2.id, a3.id, a4.id)
    assert [row.status for row in rows] == ["succeeded"] * 5
    (batch,) = engine.batch_calls
    assert batch[0] == "flux-klein"
    assert [params.prompt for params in batch[1]] == ["a1", "a2", "a3"]
    assert batch[1] == [JobParams.from_dict(job.params) for job in (a1, a2, a3)]
    assert [call.params.prompt for call in engine.calls] == ["other", "a4"]
    by_id = {row.id: row for row in rows}
    for job, seeds in ((a1, [1]), (a2, [2, 3]), (a3, [4])):
        row = by_id[job.id]
        assert row.meta["batch_size"] == 3
        assert row.outputs == job.output_names()
        assert [png_colours(outputs, name) for name in row.outputs] == [{seed_colour(s)} for s in seeds]
    assert "batch_size" not in by_id[other.id].meta and "batch_size" not in by_id[a4.id].meta
    # each job of the batch is reported started before any of them finishes
    batch_ids = {a1.id, a2.id, a3.id}
    events = [(type(r).__name__, r.job_id) for r in sink.reports
              if isinstance(r, (JobStarted, JobFinished)) and r.job_id in batch_ids]
    assert events[:3] == [("JobStarted", a1.id), ("JobStarted", a2.id), ("JobStarted", a3.id)]
    assert sorted(events[3:]) == sorted(("JobFinished", job_id) for job_id in batch_ids)
    assert all(f.outcome is Outcome.SUCCEEDED for f in sink.finished())


def test_batching_is_off_at_max_batch_size_1(make_worker, make_job, store, engine):
    jobs = [make_job(f"p{i}", batch_key="k") for i in range(3)]
    worker = make_worker()
    with running(worker):
        wait_finished(store, *(job.id for job in jobs))
    assert engine.batch_calls == [] and len(engine.calls) == 3


def test_a_failing_batch_falls_back_to_solo_runs(make_worker, make_job, store, engine, sink):
    engine.batch_error = FakeOutOfMemory("the batch did not fit")
    jobs = [make_job(f"p{i}", seeds=[i + 1], batch_key="k") for i in range(3)]
    worker = make_worker(config=WorkerConfig(max_batch_size=3, heartbeat_seconds=0.05, idle_poll_seconds=0.02))
    with running(worker):
        rows = wait_finished(store, *(job.id for job in jobs))
    assert len(engine.batch_calls) == 1 and len(engine.batch_calls[0][1]) == 3
    assert [call.params.prompt for call in engine.calls] == ["p0", "p1", "p2"]
    assert engine.released == 1  # memory released once before the solo runs
    assert [row.status for row in rows] == ["succeeded"] * 3
    assert all("batch_size" not in row.meta for row in rows)
    assert [(f.job_id, f.outcome) for f in sink.finished()] == [(job.id, Outcome.SUCCEEDED) for job in jobs]


def test_one_bad_job_in_a_batch_costs_no_other_job_its_result(make_worker, make_job, store, engine):
    engine.fail_on["bad"] = ValueError("nope")
    first, bad, last = make_job("ok1", batch_key="k"), make_job("bad", batch_key="k"), make_job("ok2", batch_key="k")
    worker = make_worker(config=WorkerConfig(max_batch_size=3, heartbeat_seconds=0.05, idle_poll_seconds=0.02))
    with running(worker):
        rows = wait_finished(store, first.id, bad.id, last.id)
    assert [row.status for row in rows] == ["succeeded", "failed", "succeeded"]
    assert rows[1].error == "Generation failed: ValueError: nope"
    assert len(engine.batch_calls) == 1 and len(engine.calls) == 3


# -- stale jobs and lost claims -------------------------------------------------------------------
def _make_stale(sessions, job_id: int, seconds: float = 3600.0) -> None:
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def test_recover_stale_requeues_running_jobs_past_their_lease(make_worker, make_job, store, sessions, sink):
    stale, fresh = make_job("stale"), make_job("fresh")
    for _ in range(2):
        store.claim_next()
    _make_stale(sessions, stale.id, seconds=60)  # lease is 30 s
    _make_stale(sessions, fresh.id, seconds=5)
    worker = make_worker()
    worker._recover_stale()
    assert job_row(store, stale.id).status == "queued" and job_row(store, stale.id).claim_token is None
    assert job_row(store, fresh.id).status == "running"
    assert sink.finished() == []  # requeued, not finished
    # recovery is throttled: a job that goes stale right after waits for the next round
    _make_stale(sessions, fresh.id, seconds=60)
    worker._recover_stale()
    assert job_row(store, fresh.id).status == "running"


def test_recover_stale_fails_a_job_out_of_attempts_and_reports_it(make_worker, make_job, store, sessions, sink):
    job = make_job()
    store.claim_next()
    _make_stale(sessions, job.id)
    worker = make_worker(config=WorkerConfig(max_attempts=1, lease_seconds=30))
    worker._recover_stale()
    row = job_row(store, job.id)
    assert row.status == "failed" and row.error.startswith("Generation was interrupted")
    assert sink.finished() == [JobFinished(job.id, Outcome.FAILED)]


def test_run_recovers_a_stale_job_and_runs_it_again(make_worker, make_job, store, sessions):
    job = make_job()
    store.claim_next()  # a worker that then died
    _make_stale(sessions, job.id)
    worker = make_worker()
    with running(worker):
        (row,) = wait_finished(store, job.id)
    assert row.status == "succeeded" and row.attempts == 2


def test_a_claim_taken_over_during_generation_ends_lost_and_records_nothing(make_worker, make_job, store, sessions,
                                                                            engine, sink):
    job = make_job(webhook=HOOK)
    new_token: list[str] = []
    engine.during_generate = lambda params: new_token.append(steal_claim(sessions, job.id))
    worker = make_worker()
    claimed = store.claim_next()
    worker.process(claimed)
    finish(worker)
    row = job_row(store, job.id)
    assert row.status == "running" and row.claim_token == new_token[0]  # left to its new owner
    assert row.outputs == [] and row.error is None and row.generation_time is None and "nsfw_scores" not in row.meta
    assert deliveries(sessions, job.id) == []
    assert sink.finished() == [JobFinished(job.id, Outcome.LOST, None, sink.finished()[0].queue_time)]


def test_a_lost_heartbeat_aborts_the_generation_as_lost(make_worker, make_job, store, sessions, engine, sink,
                                                        monkeypatch):
    """The store says the job is no longer ours: the next progress callback stops the run."""
    engine.steps, engine.step_seconds = 200, 0.01  # would take 2 s; aborted after the first beat
    job = make_job(webhook=HOOK)
    worker = make_worker()
    claimed = store.claim_next()
    monkeypatch.setattr(store, "heartbeat", lambda *args, **kwargs: False)
    monkeypatch.setattr(store, "fail", lambda *args, **kwargs: pytest.fail("a lost job must not be failed"))
    worker.process(claimed)
    finish(worker)
    assert sink.finished() == [JobFinished(job.id, Outcome.LOST, None, sink.finished()[0].queue_time)]
    row = job_row(store, job.id)
    assert row.status == "running" and row.claim_token == claimed.claim_token and row.error is None
    assert deliveries(sessions, job.id) == []


def test_a_generation_error_after_the_claim_was_taken_over_is_lost_not_failed(make_worker, make_job, store,
                                                                              sessions, engine, sink):
    job = make_job("bad")
    engine.during_generate = lambda params: steal_claim(sessions, job.id)
    engine.fail_on["bad"] = ValueError("broke after losing the claim")
    worker = make_worker()
    worker.process(store.claim_next())
    finish(worker)
    row = job_row(store, job.id)
    assert row.status == "running" and row.error is None  # nothing recorded (this part holds)
    assert [f.outcome for f in sink.finished()] == [Outcome.LOST]


def test_a_store_error_while_recording_a_failure_does_not_kill_the_worker(make_worker, make_job, store, engine,
                                                                          monkeypatch):
    engine.fail_on["bad"] = ValueError("boom")
    bad, good = make_job("bad"), make_job("good")
    real_fail, broken = store.fail, []

    def flaky_fail(*args, **kwargs):
        if not broken:
            broken.append(True)
            raise RuntimeError("database went away")
        return real_fail(*args, **kwargs)

    monkeypatch.setattr(store, "fail", flaky_fail)
    worker = make_worker()
    with running(worker) as errors:
        wait_until(lambda: errors or job_row(store, good.id).status == "succeeded", 10, "the next job or a crash")
    assert broken and errors == []
    assert job_row(store, good.id).status == "succeeded"
    assert job_row(store, bad.id).status == "running"  # left to the lease, as on the finisher path


def test_an_unknown_command_is_ignored_and_the_worker_goes_on(make_worker, make_job, store):
    worker = make_worker()
    with running(worker) as errors:
        worker.commands.put("reboot-the-gpu")
        job = make_job("after the bad command")
        wait_until(lambda: errors or job_row(store, job.id).status == "succeeded", 10, "the job or a crash")
    assert errors == [] and job_row(store, job.id).status == "succeeded"


# -- dependencies away: jobs wait, nothing fails --------------------------------------------------
def test_a_full_disk_puts_the_job_back_and_pauses_claiming_until_a_probe_passes(make_worker, make_job, store,
                                                                                outputs, sink, monkeypatch):
    import errno

    full = {"on": True}
    real_save, real_check = outputs.save, outputs.check

    def save(name, data, content_type="image/png"):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(name, data, content_type)

    def check():
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_check()

    monkeypatch.setattr(outputs, "save", save)
    monkeypatch.setattr(outputs, "check", check)
    first, second = make_job("one"), make_job("two")
    worker = make_worker()
    with running(worker) as errors:
        wait_until(lambda: worker.health.is_down(Dependency.DISK), 10, "the disk to be found full")
        row = wait_until(lambda: (r := job_row(store, first.id)).status == "queued" and r, 10, "the job to be put back")
        assert row.attempts == 0 and row.waits == 1 and row.not_before is not None and row.error is None
        time.sleep(0.5)
        assert job_row(store, second.id).status == "queued"  # claiming paused: the queue does not drain
        assert Outcome.RELEASED in [f.outcome for f in sink.finished()]
        assert any(r.dependencies.get("disk") for r in sink.statuses())  # system_details / health see it
        full["on"] = False
        wait_until(lambda: job_row(store, second.id).status == "succeeded" and job_row(store, first.id).status
                   == "succeeded", 20, "both jobs once the disk has room")
    assert errors == [] and not worker.health.degraded
    assert Outcome.FAILED not in [f.outcome for f in sink.finished()]


def test_a_permanent_failure_leaves_no_files(make_worker, make_job, store, outputs, engine):
    job = make_job("fine")
    worker = make_worker()
    worker.results.jobs = store
    real_succeed = store.succeed
    store.succeed = lambda *a, **k: (_ for _ in ()).throw(ValueError("not a dependency"))  # type: ignore[method-assign]
    try:
        worker.process(store.claim_next())
        finish(worker)
    finally:
        store.succeed = real_succeed  # type: ignore[method-assign]
    row = job_row(store, job.id)
    assert row.status == "failed" and "not a dependency" in row.error
    assert not any(outputs.path_for(name).exists() for name in row.output_names())
