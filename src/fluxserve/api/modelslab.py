"""The ModelsLab routes, built from the path-family table (``api.paths``): for every family its
generation actions and its fetch route, plus the fetch aliases clients use. Thin: parse
(FastAPI + ``api.schemas``), authenticate, delegate to ``GenerationService``.

(No ``from __future__ import annotations`` here: FastAPI reads each route function's annotations,
and a route's body type is a variable of the function that makes it.)
"""

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header
from fastapi.responses import JSONResponse

from fluxserve.api.deps import AuthKey, ServicesDep
from fluxserve.api.errors import ApiError
from fluxserve.api.paths import FETCH_ALIASES, FETCH_BY_BODY, PATH_FAMILIES, Action, PathFamily
from fluxserve.api.schemas import BODIES, FetchBody
from fluxserve.contract import ERROR_STATUSES, ErrorAnswer, ProcessingAnswer, SuccessAnswer
from fluxserve.models import TASK_WORDS

router = APIRouter()
IdempotencyHeader = Annotated[str | None, Header(
    alias="Idempotency-Key", description="Makes the request safe to send again: the same key and request answer the "
    "first one's job (kept 24 h); the same key with another request is refused (409).")]
OptionalFetchBody = Body(None)


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    answers: dict[int | str, dict[str, Any]] = {200: {"model": SuccessAnswer | ProcessingAnswer,
                     "description": "`success` with the images, or `processing` (queued or generating) with "
                                    "`fetch_result`, `eta` and `future_links`"}}
    for status in statuses:
        answers[status] = {"model": ErrorAnswer, "description": ERROR_STATUSES[status]}
    return answers


GENERATION_RESPONSES = _responses(400, 401, 404, 408, 413, 429, 500, 503)
FETCH_RESPONSES = _responses(401, 404, 500)


def parse_job_id(raw: str | int | None) -> int:
    try:
        return int(str(raw).strip())
    except (TypeError, ValueError):
        raise ApiError(404, "Request not found") from None


def _description(family: PathFamily, action: Action) -> str:
    words = TASK_WORDS[action.task]
    if action.model:
        return f"{words.capitalize()} with `{action.model}` (`model_id` is ignored here)."
    default = f"default `{action.default_model}`" if action.default_model else "required"
    return f"{words.capitalize()} with the model named by `model_id` ({default}; aliases accepted)."


def _generation_route(family: PathFamily, action: Action):
    body_type = BODIES[action.task]

    async def generate(body: body_type, key: AuthKey, services: ServicesDep,  # type: ignore[valid-type]
                       idempotency_key: IdempotencyHeader = None) -> JSONResponse:
        return await services.generation.generate(key, family, action, body, idempotency_key)

    return generate


async def fetch(job_id: str, key: AuthKey, services: ServicesDep) -> JSONResponse:
    """Any of the key's requests: success, processing, or failed (all HTTP 200)."""
    return await services.generation.fetch(key, parse_job_id(job_id))


async def fetch_by_body(key: AuthKey, services: ServicesDep, body: FetchBody = OptionalFetchBody) -> JSONResponse:
    """The id as ``request_id`` in the body."""
    if body is None or body.request_id is None:
        raise ApiError(400, "request_id is required")
    return await services.generation.fetch(key, body.request_id)


for _family in PATH_FAMILIES:
    _tags: list[str | Enum] = [_family.prefix.removeprefix("/api/")]  # the type add_api_route asks for
    for _action in _family.actions:
        router.add_api_route(
            f"{_family.prefix}/{_action.name}", _generation_route(_family, _action), methods=["POST"],
            name=f"{_family.server}_{_action.name}", tags=_tags, summary=f"{TASK_WORDS[_action.task]} ({_family.server})",
            description=_description(_family, _action), responses=GENERATION_RESPONSES,
        )
    router.add_api_route(
        _family.fetch_path.replace("{id}", "{job_id}"), fetch, methods=["POST"],
        name=f"{_family.server}_fetch", tags=_tags, summary="Fetch a request's result (any of the key's requests)",
        responses=FETCH_RESPONSES,
    )
for _path in FETCH_ALIASES:
    router.add_api_route(_path.replace("{id}", "{job_id}"), fetch, methods=["POST"], tags=["fetch"],
                         name=f"fetch_{_path}", summary="Fetch a request's result", responses=FETCH_RESPONSES)
for _path in FETCH_BY_BODY:
    router.add_api_route(_path, fetch_by_body, methods=["POST"], tags=["fetch"], name=f"fetch_by_body_{_path}",
                         summary="Fetch a request's result by request_id", responses=FETCH_RESPONSES)
