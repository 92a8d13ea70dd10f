"""The worker's claim is scheduled: it passes the models its engine holds (affinity, bounded by
``affinity_seconds``) and its model group to ``JobStore.claim_next``; settings become the
worker's config (``FLUXSERVE_AFFINITY_SECONDS``, ``FLUXSERVE_WORKER_MODELS``)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError

from fluxserve.config import Settings, settings_problems
from fluxserve.worker import WorkerConfig
from tests.worker.conftest import FAST, job_row, running, wait_finished


class SpyStore:
    """The real store, with every claim_next call's arguments recorded."""

    def __init__(self, store):
        self._store = store
        self.lock = threading.Lock()
        self.claims: list[dict[str, Any]] = []

    def claim_next(self, **kwargs: Any):
        with self.lock:
            self.claims.append({**kwargs, "loaded": list(kwargs.get("loaded", ()))})
        return self._store.claim_next(**kwargs)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def test_the_claim_passes_the_loaded_models_the_affinity_and_the_model_group(make_worker, make_job, store,
                                                                             registry, engine):
    engine.load(registry.get("flux"))  # the engine already holds flux
    spy = SpyStore(store)
    worker = make_worker(replace(FAST, affinity_seconds=12.5, models=("flux", "flux-fill")), jobs=spy)
    job = make_job("a lighthouse", model="flux")
    with running(worker):
        (row,) = wait_finished(store, job.id)
    assert row.status == "succeeded"
    assert spy.claims, "the worker never claimed"
    for claim in spy.claims:
        assert claim["affinity_seconds"] == 12.5
        assert claim["models"] == ("flux", "flux-fill")
        assert claim["loaded"] == ["flux"]  # Engine.loaded()'s pipelines as model names, asked at each claim


def test_a_worker_claims_only_its_model_group(make_worker, make_job, store):
    other = make_job("not mine", model="flux-klein")
    mine = make_job("mine", model="flux")
    worker = make_worker(replace(FAST, models=("flux",)))
    with running(worker):
        wait_finished(store, mine.id)
        time.sleep(0.2)  # several idle polls: the other group's job is never claimed
    assert job_row(store, mine.id).status == "succeeded"
    assert job_row(store, other.id).status == "queued"


def test_a_worker_prefers_the_model_it_holds_until_another_job_has_waited_the_affinity(make_worker, make_job,
                                                                                   store, registry, engine):
    engine.load(registry.get("flux"))
    first = make_job("queued first, another model", model="flux-klein")
    second = make_job("queued second, the loaded model", model="flux")
    worker = make_worker(replace(FAST, affinity_seconds=3600.0))
    with running(worker):
        wait_finished(store, first.id, second.id)
    rows = {row.id: row for row in (job_row(store, first.id), job_row(store, second.id))}
    assert rows[second.id].started_at <= rows[first.id].started_at  # no model swap for the job behind

    engine.clear()
    engine.load(registry.get("flux"))
    third = make_job("another model, waited enough", model="flux-klein")
    fourth = make_job("the loaded model", model="flux")
    worker = make_worker(replace(FAST, affinity_seconds=0.0))  # every job has waited "enough": oldest first
    with running(worker):
        wait_finished(store, third.id, fourth.id)
    assert job_row(store, third.id).started_at <= job_row(store, fourth.id).started_at


def test_worker_config_from_settings_takes_the_affinity_and_the_group_by_registry_name(tmp_path):
    settings = Settings(data_dir=tmp_path, affinity_seconds=7, worker_models="flux-dev, flux-klein,flux")
    config = WorkerConfig.from_settings(settings)
    assert config.affinity_seconds == 7.0
    assert config.models == ("flux", "flux-klein")  # the alias flux-dev is flux; listed once
    assert WorkerConfig.from_settings(Settings(data_dir=tmp_path)).models is None  # unset: every model
    assert WorkerConfig.from_settings(Settings(data_dir=tmp_path, worker_models="")).models is None


def test_an_unknown_model_in_the_group_is_refused_naming_the_variable(tmp_path):
    with pytest.raises(ValidationError) as caught:
        Settings(data_dir=tmp_path, worker_models="flux,flux-pro")
    (line,) = settings_problems(caught.value)
    assert line.startswith("FLUXSERVE_WORKER_MODELS: unknown model 'flux-pro'; known: ")
    assert "flux-klein" in line


def test_a_negative_affinity_is_refused(tmp_path):
    with pytest.raises(ValidationError) as caught:
        Settings(data_dir=tmp_path, affinity_seconds=-1)
    assert settings_problems(caught.value)[0].startswith("FLUXSERVE_AFFINITY_SECONDS:")


def test_loaded_pipelines_map_to_every_model_sharing_them(make_worker, registry, engine):
    """Engine.loaded() names pipelines (class and weights); models sharing them are all loaded."""
    worker = make_worker()
    assert worker.loaded_models() == []
    engine.load(registry.get("realtime"))
    shared = [spec.name for spec in registry.specs() if spec.pipeline_key == registry.get("realtime").pipeline_key]
    assert "realtime" in shared and worker.loaded_models() == shared


def test_the_production_engine_names_pipelines_as_model_specs_do():
    from fluxserve.engine.loading import _key
    from fluxserve.models import Registry

    for spec in Registry.build().specs():
        assert _key((spec.pipeline, spec.source)) == spec.pipeline_key
