"""FastAPI dependencies: the services container and API key authentication."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from fluxserve.api.errors import ApiError
from fluxserve.api.generation import GenerationService
from fluxserve.jobs.deliveries import WebhookDeliveries
from fluxserve.jobs.tables import ApiKey
from fluxserve.jobs.workers import WorkerRegistry
from fluxserve.keys import KeyStore

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class WorkerControl(Protocol):
    """What the API may ask of whoever hosts the GPU worker (``fluxserve.supervisor``)."""

    def describe(self) -> dict[str, Any]: ...
    def command(self, command: Any) -> None: ...  # a worker.messages.Command
    def restart(self, settings: Any = None) -> None: ...


@dataclass
class Services:
    generation: GenerationService
    keys: KeyStore
    host: WorkerControl | None = None
    worker_status: Callable[[], dict[str, Any]] = field(default=lambda: {})
    workers: WorkerRegistry | None = None  # every worker of the cluster (local or not), from the database
    reload_settings: Callable[[], Any] | None = None
    storage_configs: Any = None  # fluxserve.storage.configs.StorageConfigs
    deliveries: WebhookDeliveries | None = None  # webhook dead letters (api.webhook_admin)


def get_services(request: Request) -> Services:
    return request.app.state.services


async def _presented_key(request: Request) -> str | None:
    """The key from a `Key` header, `Authorization: Bearer`, or the JSON body's `key`."""
    header = request.headers.get("key") or request.headers.get("x-api-key")
    if header:
        return header.strip()
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if request.headers.get("content-type", "").startswith(FORM_TYPES):
        return None  # a form (the OpenAI edits upload) carries no key, and FastAPI has read its body already
    try:
        body = await request.json()
    except ValueError:
        return None
    key = body.get("key") if isinstance(body, dict) else None
    return None if key is None else key if isinstance(key, str) else str(key)  # a number is a (wrong) key


async def require_key(request: Request, services: Annotated[Services, Depends(get_services)]) -> ApiKey:
    presented = await _presented_key(request)
    if not presented or not presented.strip():
        raise ApiError(401, "API key required")
    key = await run_in_threadpool(services.keys.authenticate, presented)
    if key is None:
        raise ApiError(401, "Invalid API key")
    await request.app.state.rate_limits.check_key(key.id)
    return key


async def require_admin_key(key: Annotated[ApiKey, Depends(require_key)]) -> ApiKey:
    if not key.is_admin:
        raise ApiError(403, "This endpoint needs an admin key")
    return key


AuthKey = Annotated[ApiKey, Depends(require_key)]
AdminKey = Annotated[ApiKey, Depends(require_admin_key)]
ServicesDep = Annotated[Services, Depends(get_services)]
