"""``GET /api/fluxserve/catalog``: what this server serves, for the playground (and any client
that wants to build a form): every generation path of the path-family table (``api.paths``) with
its task and model choice, and every model of the registry in effect with its family's limits
and defaults. Derived from the table and the registry, so the playground holds no second list.

Public, like ``/openapi.json``: it names paths and models, nothing of any key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from fluxserve.api.deps import ServicesDep
from fluxserve.api.paths import ADMIN_SERVERS, PATH_FAMILIES, Action, PathFamily
from fluxserve.api.schemas import MAX_PROMPT_CHARS, MAX_SIDE
from fluxserve.loras import MAX_ADAPTERS, STRENGTH_MAX, STRENGTH_MIN, LoraCatalog
from fluxserve.models import TASK_WORDS, ModelSpec, Registry
from fluxserve.params import SEED_MAX

catalog_router = APIRouter(prefix="/api/fluxserve", tags=["fluxserve"])


def model_item(spec: ModelSpec) -> dict[str, Any]:
    limits = spec.family.limits
    return {
        "name": spec.name, "aliases": list(spec.aliases), "family": spec.family.name,
        "tasks": [task.value for task in TASK_WORDS if spec.supports(task)],
        "steps": spec.steps, "guidance": spec.guidance, "strength": spec.strength,
        "max_init_images": spec.init_image_limit, "second_image": limits.second_image,
        "negative_prompt": limits.negative_prompt, "loras": spec.family.takes_loras,
    }


def path_item(family: PathFamily, action: Action, registry: Registry) -> dict[str, Any]:
    """One generation route; ``models``: the ones it can serve (its own, or every model able to do
    its task when ``model_id`` comes from the body), ``default_model`` first."""
    if action.model is not None:
        models = [action.model]
    else:
        models = registry.for_task(action.task)
        if action.default_model in models:
            models.remove(action.default_model)
            models.insert(0, action.default_model)
    return {
        "path": f"{family.prefix}/{action.name}", "server": family.server, "prefix": family.prefix,
        "action": action.name, "task": action.task.value, "model": action.model,
        "default_model": action.model or action.default_model, "takes_model_id": action.takes_model_id,
        "models": models, "min_side": family.min_side, "max_side": MAX_SIDE, "side_multiple": family.side_multiple,
        "fetch": family.fetch_path,
    }


def build_catalog(registry: Registry, loras: list[str]) -> dict[str, Any]:
    return {
        "status": "ok",
        "tasks": [{"task": task.value, "words": words} for task, words in TASK_WORDS.items()],
        "models": [model_item(spec) for spec in registry.specs()],
        "paths": [path_item(family, action, registry) for family in PATH_FAMILIES for action in family.actions],
        "admin_servers": list(ADMIN_SERVERS),
        "loras": loras,
        "limits": {"samples": [1, 4], "steps": [1, 50], "guidance": [0, 20], "strength": [0, 1], "seed_max": SEED_MAX,
                   "prompt_chars": MAX_PROMPT_CHARS, "lora_adapters": MAX_ADAPTERS,
                   "lora_strength": [STRENGTH_MIN, STRENGTH_MAX]},
    }


@catalog_router.get("/catalog")
async def catalog(services: ServicesDep) -> dict:
    """The generation paths (path, task, model or `model_id` choice, size range), the models with
    their tasks, limits and defaults, the enterprise admin servers and the LoRA adapters on offer."""
    generation = services.generation
    loras = await run_in_threadpool(lambda: LoraCatalog.from_settings(generation.settings).available())
    return build_catalog(generation.registry, loras)
