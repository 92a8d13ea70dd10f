"""worker.messages and worker.config: the typed commands and reports (plain picklable values:
they cross the process boundary in process mode) and the typed settings."""

from __future__ import annotations

import multiprocessing
import pickle

import pytest

from fluxserve.config import Settings
from fluxserve.worker.config import WorkerConfig
from fluxserve.worker.messages import Command, JobFinished, JobStarted, NullSink, Outcome, StatusReport


def test_commands_and_outcomes_are_their_wire_strings():
    assert {command.value for command in Command} == {"stop", "clear_cache", "status", "wake"}
    assert Command("clear_cache") is Command.CLEAR_CACHE
    assert Command.STOP == "stop"  # a str enum: plain strings and members compare equal
    assert {outcome.value for outcome in Outcome} == {"succeeded", "failed", "lost", "released"}
    with pytest.raises(ValueError):
        Command("reboot")


@pytest.mark.parametrize("message", [
    Command.CLEAR_CACHE,
    JobStarted(7, "0f0e0d0c-0000-4000-8000-000000000000"),
    JobFinished(7, Outcome.LOST),
    JobFinished(8, Outcome.SUCCEEDED, 1.25, 0.5),
    StatusReport(models_loaded=["flux-klein"], device="cuda:0", gpu_memory={"allocated_bytes": 3},
                 residency={"flux-klein": "gpu"}, optimizations={"flux-klein": ["compile"]}),
], ids=["command", "started", "finished-lost", "finished", "status"])
def test_messages_survive_a_trip_through_a_multiprocessing_queue(message):
    assert pickle.loads(pickle.dumps(message)) == message
    reports = multiprocessing.get_context("spawn").SimpleQueue()  # what the supervisor's queues pickle
    reports.put(message)
    assert reports.get() == message


def test_job_finished_defaults():
    finished = JobFinished(3, Outcome.FAILED)
    assert (finished.generation_time, finished.queue_time) == (None, 0.0)


def test_status_report_as_dict_has_every_field():
    report = StatusReport(models_loaded=["a"], device="cpu", gpu_memory=None, residency=1, optimizations=2,
                          dependencies={"disk": {"reason": "full"}})
    assert report.as_dict() == {"models_loaded": ["a"], "device": "cpu", "gpu_memory": None, "residency": 1,
                                "optimizations": 2, "dependencies": {"disk": {"reason": "full"}}}
    assert StatusReport().as_dict() == {"models_loaded": [], "device": None, "gpu_memory": None,
                                        "residency": None, "optimizations": None, "dependencies": {}}
    assert StatusReport(**report.as_dict()) == report  # what Worker.report_status builds from engine.status()


def test_null_sink_takes_any_report():
    NullSink().report(JobFinished(1, Outcome.SUCCEEDED))


def test_worker_config_from_settings():
    settings = Settings(max_job_attempts=5, lease_seconds=9.0, heartbeat_seconds=1.5, retention_seconds=60.0,
                        max_batch_size=4, batch_wait_seconds=0.25)
    config = WorkerConfig.from_settings(settings)
    assert config == WorkerConfig(max_attempts=5, lease_seconds=9.0, heartbeat_seconds=1.5, retention_seconds=60.0,
                                  max_batch_size=4, batch_wait_seconds=0.25)
    assert config.idle_poll_seconds == WorkerConfig().idle_poll_seconds
