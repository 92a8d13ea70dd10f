"""ModelsLab-shaped errors: every refusal is {"status": "error", "message": ...}."""

from __future__ import annotations

import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxserve.dependencies import transient_dependency

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, **extra):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.extra = extra


def error_response(status_code: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"status": "error", "message": message, **extra}, status_code=status_code,
                        headers=retry_headers(extra.get("retry_after")))


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "Not found", 405: "Method not allowed"}
        return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)))

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
        return error_response(503, "Service temporarily unavailable", retry_after=5,
                              reason=f"{dependency.value} unavailable")

    app.add_exception_handler(SQLAlchemyError, _dependency_error)
    app.add_exception_handler(OSError, _dependency_error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "Internal server error. Please try again.")
