"""The answers of the ModelsLab contract, typed: what HTTP answers, webhooks and stored failures
carry. One definition each, used by the API (``api.answers``), the worker (the success
webhook), the job store (failure webhooks) and ``/docs`` (the answer shapes and status codes).

Imports neither torch nor the web framework: pydantic only.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Answer(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. an error's retry_after, a failure's id

    #: fields left out of the body when they are None (documented as sometimes present)
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    def body(self) -> dict[str, Any]:
        """The JSON object clients receive."""
        skip = {name for name in self.omitted_when_none if getattr(self, name, None) is None}
        return self.model_dump(mode="json", exclude=skip)


class SuccessAnswer(Answer):
    """A finished request: ``output`` holds the image URLs (or, with ``base64``, the images)."""

    omitted_when_none: ClassVar[frozenset[str]] = frozenset({"message", "track_id", "webhook_status", "tip", "warning"})

    status: Literal["success"] = "success"
    generationTime: float = Field(description="Seconds spent generating (model loading excluded).")
    id: int
    output: list[str]
    proxy_links: list[str] = Field(description="The image URLs (also when output holds base64).")
    nsfw_content_detected: bool = False
    webhook_status: str | None = Field(
        None, description='"" without a webhook; pending | delivered | failed (refused by the receiver) | dead '
        '(still failing when its retry window ended).')
    tip: str | None = None
    warning: str | None = Field(None, description='"" (ModelsLab has the field; typed clients read it).')
    message: str | None = Field(None, description="Set when the images expired and were deleted.")
    track_id: str | None = Field(None, description="Webhooks only: the request's track_id.")
    meta: dict[str, Any] = Field(description="Every parameter used: seed(s), size, steps, model_id, ...")


class ProcessingAnswer(Answer):
    """Queued or generating: fetch ``fetch_result`` later, or wait for ``future_links``."""

    status: Literal["processing"] = "processing"
    tip: str
    tip_1: str = ""
    webhook_status: str = Field("", description='"" without a webhook; pending until the job ends.')
    eta: float = Field(description="Estimated seconds until the images are ready.")
    message: str = "Request processing"
    fetch_result: str
    id: int
    output: list[str] = Field(default_factory=list)
    meta: dict[str, Any]
    future_links: list[str] = Field(description="The exact URLs the images will have.")
    proxy_links: list[str]


class FailedAnswer(Answer):
    """A request that was accepted and then failed or was cancelled: the failure webhook's body,
    and what every fetch (and the generation request itself) answers for it, with HTTP 200 (the
    request was served; the job failed). Clients' polling loops stop on ``"failed"``."""

    status: Literal["failed"] = "failed"
    id: int
    message: str
    track_id: str | None = None


class ErrorAnswer(Answer):
    """A refusal of a request that can't be served: bad input, a bad key, an unknown model or
    request id, a limit (429 with ``retry_after``)."""

    status: Literal["error"] = "error"
    message: str


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    return ErrorAnswer(message=message, **extra).body()


#: What ModelsLab documents for the statuses the service sends, for ``/docs``.
ERROR_STATUSES: dict[int, str] = {
    400: "Bad input (missing prompt, out-of-range value, an init image that can't be fetched or decoded)",
    401: "Missing or invalid API key",
    403: "An admin endpoint called with a user key",
    404: "Unknown model (`Model not found: X`), request or route",
    408: "The request body took too long to arrive",
    409: "The request can't change now (e.g. cancelling a job that already runs)",
    413: "The request body is too large",
    429: "Rate limit or queued-request limit exceeded (`retry_after` in the body, `Retry-After` and "
         "`X-RateLimit-Reset` headers)",
    500: "An internal error (a failed *job* is answered 200 with status `failed`)",
    503: "Service temporarily unavailable",
}


# -- the OpenAI Images API (``api.openai``): its answers and its error shape --------------------
class OpenAIImage(BaseModel):
    """One image: ``url`` or ``b64_json`` (a PNG) as ``response_format`` asked; ``revised_prompt``
    when ``enhance_prompt`` rewrote the prompt."""

    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesAnswer(BaseModel):
    """``POST /v1/images/generations`` and ``/v1/images/edits``."""

    created: int = Field(description="Unix time the request was queued.")
    data: list[OpenAIImage]

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class OpenAIModel(BaseModel):
    id: str = Field(description="A served model name (what `model` takes; aliases are accepted there too).")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fluxserve"


class OpenAIModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, requests (rate limits) or server_error.")
    param: str | None = Field(None, description="The request field at fault, when there is one.")
    code: str | None = Field(None, description="e.g. invalid_api_key, model_not_found, rate_limit_exceeded, timeout.")


class OpenAIErrorAnswer(BaseModel):
    """Every refusal on ``/v1/``: OpenAI's error shape (the SDKs raise their exception types from it)."""

    error: OpenAIErrorDetail


_OPENAI_ERROR_TYPES = {429: "requests"}  # else invalid_request_error below 500, server_error from 500
_OPENAI_ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 413: "request_too_large", 408: "timeout",
                       504: "timeout"}


def openai_error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error answer for an HTTP status: type and code follow the status unless given."""
    kind = _OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    detail = OpenAIErrorDetail(message=message, type=kind, param=param, code=code or _OPENAI_ERROR_CODES.get(status))
    return OpenAIErrorAnswer(error=detail).model_dump(mode="json")


#: The statuses the OpenAI routes answer with, for ``/docs``.
OPENAI_ERROR_STATUSES: dict[int, str] = {
    400: "Bad input (`size`, `n`, a missing prompt or image, an image that can't be decoded, a model that can't "
         "do this)",
    401: "Missing or invalid API key (`invalid_api_key`)",
    404: "Unknown model (`model_not_found`) or route",
    408: "The request body took too long to arrive",
    409: "The `Idempotency-Key` was already used with a different request",
    410: "The request was cancelled (e.g. by `clear_queue`) before its images were made",
    413: "The request body is too large",
    429: "Rate limit or queued-request limit exceeded (`Retry-After` header, in seconds)",
    500: "The generation failed (the message says why) or an internal error",
    503: "A dependency (database, disk, object store) is away: retry later (`Retry-After`); after the request "
         "was queued, the message names its id instead",
    504: "The images were not ready within `FLUXSERVE_OPENAI_WAIT_SECONDS`; the message names the request id to fetch "
         "it with the ModelsLab fetch routes",
}
