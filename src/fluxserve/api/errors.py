"""Every refusal, rendered in one place (``render_error``) in the shape of the API that was
called: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` under ``/v1/`` (the OpenAI
Images API), ModelsLab's ``{"status": "error", "message": ...}`` everywhere else. The exception
handlers here and the middleware refusals (``api.limits``) both go through it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxserve.api.json_newline import NewlineJSONResponse
from fluxserve.contract import error_body, openai_error_body
from fluxserve.dependencies import transient_dependency

log = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"


class ApiError(Exception):
    """A refusal. ``extra`` goes into ModelsLab's body (e.g. ``retry_after``, which also becomes the
    ``Retry-After`` and ``X-RateLimit-Reset`` headers); ``param`` and ``code`` into OpenAI's;
    ``headers`` are sent with either."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.extra = extra


def speaks_openai(path: str) -> bool:
    return path == OPENAI_PREFIX.rstrip("/") or path.startswith(OPENAI_PREFIX)


def render_error(path: str, status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None, **extra: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and headers of a refusal on ``path``."""
    sent = {**retry_headers(extra.get("retry_after")), **(headers or {})}
    if speaks_openai(path):
        reason = extra.get("reason")  # e.g. a 503's "database unavailable": OpenAI's shape has only the message
        return openai_error_body(status_code, f"{message} ({reason})" if reason else message, param=param, code=code), sent
    return error_body(message, **extra), sent


def error_response(path: str, status_code: int, message: str, **details: Any) -> JSONResponse:
    body, headers = render_error(path, status_code, message, **details)
    return NewlineJSONResponse(body, status_code=status_code, headers=headers)


def _api_error_response(path: str, exc: ApiError) -> JSONResponse:
    return error_response(path, exc.status_code, exc.message, param=exc.param, code=exc.code, headers=exc.headers,
                          **exc.extra)


def retry_headers(retry_after: object) -> dict[str, str]:
    """With a ``retry_after`` (seconds), the headers clients read on a 429 or 503: ``Retry-After``
    (seconds) and ``X-RateLimit-Reset`` (the unix time the limit resets; the ModelsLab CLI reads it)."""
    if not isinstance(retry_after, (int, float)) or isinstance(retry_after, bool):
        return {}
    seconds = max(0, math.ceil(retry_after))
    return {"Retry-After": str(seconds), "X-RateLimit-Reset": str(math.ceil(time.time()) + seconds)}


def validation_message(exc: RequestValidationError) -> str:
    """One readable sentence from pydantic's first complaint."""
    error = exc.errors()[0]
    kind = error.get("type", "")
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if kind == "json_invalid":
        return "Request body is not valid JSON"
    if not loc and kind in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return "Request body must be a JSON object"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc or message.startswith(loc[0]):
        return message
    return f"{'.'.join(loc)} {message}" if message.startswith("must") else f"{'.'.join(loc)}: {message}"


def validation_param(exc: RequestValidationError) -> str | None:
    """The top-level field pydantic's first complaint is about (OpenAI's ``param``)."""
    error = exc.errors()[0]
    if error.get("type") == "json_invalid":  # its loc is a position in the text
        return None
    names = [part for part in error.get("loc", ()) if part != "body" and isinstance(part, str)]
    return names[0] if names else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _api_error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, 400, validation_message(exc), param=validation_param(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "Not found", 405: "Method not allowed"}
        return error_response(request.url.path, exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                              headers=exc.headers)

    async def _dependency_error(request: Request, exc: Exception) -> JSONResponse:
        """The database (or the disk) away: an honest 503 with a retry hint, one log line per
        outage. Registered for these exception types (not as the catch-all below, which Starlette
        re-raises after answering: uvicorn would then drop the client's kept-alive connection)."""
        dependency = transient_dependency(exc)
        if dependency is None:
            return await _unexpected(request, exc)
        health = getattr(request.app.state, "health", None)
        if health is not None:
            health.down(dependency, f"{type(exc).__name__}: {exc}"[:300])
        return error_response(request.url.path, 503, "Service temporarily unavailable", retry_after=5,
                              reason=f"{dependency.value} unavailable")

    app.add_exception_handler(SQLAlchemyError, _dependency_error)
    app.add_exception_handler(OSError, _dependency_error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, "Internal server error. Please try again.")
