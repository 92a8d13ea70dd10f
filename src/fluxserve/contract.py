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
