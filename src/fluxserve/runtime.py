"""Assembling the running service from settings: registry, app, worker."""

from __future__ import annotations

from fastapi import FastAPI

from fluxserve.api.app import create_app
from fluxserve.config import Settings
from fluxserve.events import JobEvents
from fluxserve.models import Registry


def build_registry(settings: Settings, *, build_tiny: bool = True) -> Registry:
    tiny_root = None
    if settings.models == "tiny":
        tiny_root = settings.tiny_models_dir
        if build_tiny:
            from fluxserve.engine.tiny import build_tiny_models

            build_tiny_models(tiny_root)
    return Registry.build(settings.model_overrides, tiny_root=tiny_root)


def build_server_app(settings: Settings) -> FastAPI:
    """The API with an in-process worker thread started and stopped with the app."""
    from fluxserve.engine.loading import PipelineCache, pick_device, pick_dtype
    from fluxserve.jobs.database import open_database
    from fluxserve.jobs.store import JobStore
    from fluxserve.safety import SafetyChecker
    from fluxserve.storage.local import LocalStorage
    from fluxserve.worker import Worker

    registry = build_registry(settings)
    events = JobEvents()
    device = pick_device(settings.device)
    worker = Worker(
        registry=registry, jobs=JobStore(open_database(settings.resolved_database_url)), events=events,
        pipelines=PipelineCache(device, pick_dtype(device)), safety=SafetyChecker(settings.nsfw_threshold),
        outputs=LocalStorage(settings.outputs_dir, settings.base_url),
        inputs=LocalStorage(settings.inputs_dir, settings.base_url), max_attempts=settings.max_job_attempts,
    )
    return create_app(settings, registry, events=events, on_startup=worker.start, on_shutdown=worker.stop)
