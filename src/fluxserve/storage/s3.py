"""Uploading generated images to a user's S3-compatible bucket (ModelsLab ``update_s3``).

``S3Details.from_modelslab`` turns the update_s3 fields into where to write: the API endpoint,
the bucket, and the key prefix. ModelsLab's own example names the bucket only through a
virtual-hosted endpoint (``https://stable-diffusion-api.s3.amazonaws.com``); others give a plain
endpoint (``https://storage.googleapis.com``) and ``image_directory: "bucket/prefix"``.

Returned URLs are ``public_url + "/" + name``: ``public_url`` already includes the directory.

Error messages never contain the secret key or the access key id.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["S3Details", "S3Storage", "S3Uploader", "UploadError"]

NO_BUCKET_MESSAGE = (
    "bucket could not be determined: pass bucket, a virtual-hosted endpoint_url, or image_directory as bucket/prefix"
)

# <bucket>.s3.amazonaws.com, <bucket>.s3.<region>.amazonaws.com, <bucket>.s3-<region>.amazonaws.com (+ .cn);
# AWS bucket names may contain dots, so everything before the S3 host is the bucket.
_AWS_VIRTUAL_HOST = re.compile(
    r"^(?P<bucket>[a-z0-9][a-z0-9.-]*?)\.(?P<rest>s3(?:[.-](?P<region>[a-z0-9-]+))?\.amazonaws\.com(?:\.cn)?)$"
)
# Other providers (Wasabi, Backblaze, Filebase, ...): the first label, when the rest starts with "s3."
_GENERIC_VIRTUAL_HOST = re.compile(r"^(?P<bucket>[a-z0-9][a-z0-9_-]*)\.(?P<rest>s3\.[a-z0-9.-]+)$")
# Loose enough for AWS legacy names and GCS (underscores, up to 222+ chars with dots).
_BUCKET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
_REGION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Object names: path segments that start with a letter or digit (no "", ".", "..", no leading "/"),
# and only characters that need no quoting in the public URL.
_OBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_MAX_NAME = 512


class UploadError(RuntimeError):
    """An upload, verification or check that failed after its retries. The message is safe to
    show the user: it names the bucket and key but never the credentials. ``transient_dependency``
    is ``"object_store"`` when the store could not be reached or answered 5xx (waiting may fix it:
    the job is kept), None when it refused (no such bucket, access denied: the job fails)."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient_dependency = "object_store" if transient else None


def _http_url(value: object, what: str) -> str:
    """A http(s) URL without credentials, query or fragment, with no trailing slash."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a http(s) URL")
    text = value.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"{what} is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be a http(s) URL")
    if "@" in parts.netloc:
        raise ValueError(f"{what} must not contain credentials")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} must not have a query or fragment")
    return f"{parts.scheme.lower()}://{parts.netloc}{parts.path.rstrip('/')}"


def _clean_prefix(value: object, what: str = "prefix") -> str:
    """"/a//b/" -> "a/b"; "" stays ""."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    segments = [s for s in value.strip().replace("\\", "/").split("/") if s]
    for segment in segments:
        if segment in (".", ".."):
            raise ValueError(f"{what} must not contain '.' or '..' segments")
        if any(ord(c) < 32 for c in segment):
            raise ValueError(f"{what} must not contain control characters")
    return "/".join(segments)


def _check_bucket(value: object) -> str:
    if not isinstance(value, str) or not _BUCKET_NAME.match(value.strip()):
        raise ValueError(f"bucket {value!r} is not a valid bucket name")
    return value.strip()


def _required_text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return value.strip()


def _virtual_host(endpoint_url: str) -> tuple[str, str, str | None] | None:
    """(bucket, endpoint without the bucket, region named by the host) for a virtual-hosted
    endpoint, else None."""
    parts = urlsplit(endpoint_url)
    host = (parts.hostname or "").lower()
    region: str | None = None
    match = _AWS_VIRTUAL_HOST.match(host)
    if match:
        region = match.group("region")
        if region is None or region == "external-1":
            region = "us-east-1"
        elif region in ("accelerate", "dualstack"):
            region = None
    else:
        match = _GENERIC_VIRTUAL_HOST.match(host)
        if not match:
            return None
    port = f":{parts.port}" if parts.port is not None else ""
    endpoint = f"{parts.scheme}://{match.group('rest')}{port}{parts.path.rstrip('/')}"
    return match.group("bucket"), endpoint, region


@dataclass(frozen=True)
class S3Details:
    endpoint_url: str | None  # None: AWS's own endpoint for region_name
    region_name: str | None
    bucket: str
    prefix: str  # key prefix inside the bucket, no leading/trailing "/", may be ""
    public_url: str  # base of the returned URLs (already includes the directory)
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "endpoint_url", _http_url(self.endpoint_url, "endpoint_url") if self.endpoint_url else None)
        region = self.region_name.strip() if isinstance(self.region_name, str) else self.region_name
        if region is not None and region != "" and not (isinstance(region, str) and _REGION.match(region)):
            raise ValueError("region_name is not a valid region name")
        set_(self, "region_name", region or None)
        set_(self, "bucket", _check_bucket(self.bucket))
        set_(self, "prefix", _clean_prefix(self.prefix))
        set_(self, "public_url", _http_url(self.public_url, "public_url"))
        set_(self, "access_key_id", _required_text(self.access_key_id, "aws_access_key_id"))
        set_(self, "secret_access_key", _required_text(self.secret_access_key, "aws_secret_access_key"))

    @classmethod
    def from_modelslab(
        cls,
        *,
        public_url: str,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        aws_access_key_id: str,
        aws_secret_access_key: str,
        image_directory: str | None = None,
        bucket: str | None = None,
    ) -> S3Details:
        """The update_s3 fields as S3Details. The bucket is ``bucket`` if given; else the one a
        virtual-hosted ``endpoint_url`` names (the endpoint then loses it); else the first
        segment of ``image_directory`` (the rest is the prefix). Raises ValueError."""
        endpoint = _http_url(endpoint_url, "endpoint_url") if endpoint_url and endpoint_url.strip() else None
        region = region_name.strip() if isinstance(region_name, str) and region_name.strip() else None
        directory = _clean_prefix(image_directory, "image_directory")
        explicit = bucket.strip() if isinstance(bucket, str) and bucket.strip() else None
        hosted = _virtual_host(endpoint) if endpoint else None

        if hosted is not None:
            host_bucket, endpoint, host_region = hosted
            if explicit is not None and explicit != host_bucket:
                raise ValueError(
                    f"bucket {explicit!r} conflicts with the bucket {host_bucket!r} named by endpoint_url"
                )
            chosen, prefix = host_bucket, directory
            region = region or host_region
        elif explicit is not None:
            chosen, prefix = explicit, directory
        elif directory:
            chosen, _, prefix = directory.partition("/")
        else:
            raise ValueError(NO_BUCKET_MESSAGE)

        return cls(
            endpoint_url=endpoint,
            region_name=region,
            bucket=chosen,
            prefix=prefix,
            public_url=public_url,
            access_key_id=aws_access_key_id,
            secret_access_key=aws_secret_access_key,
        )

    def key_for(self, name: str) -> str:
        """The object key for an output name: ``prefix/name``, or ``name`` without a prefix."""
        if not isinstance(name, str) or len(name) > _MAX_NAME or not _OBJECT_NAME.match(name):
            raise ValueError(f"unsafe object name {name!r}")
        return f"{self.prefix}/{name}" if self.prefix else name

    def url_for(self, name: str) -> str:
        return self.public_url.rstrip("/") + "/" + name

    def where(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region_name or 'us-east-1'})"


class S3Uploader:
    """Uploads with retries (``attempts`` tries in all, botocore's standard retry mode), caching
    one boto3 client per endpoint/region/credentials. Thread-safe."""

    max_clients = 128

    def __init__(self, *, attempts: int = 3, connect_timeout: float = 5, read_timeout: float = 30):
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.attempts = int(attempts)
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self._clients: OrderedDict[tuple, Any] = OrderedDict()  # boto3 clients: generated at runtime, untyped
        self._lock = threading.Lock()

    # -- clients ---------------------------------------------------------------------------
    def client(self, details: S3Details):
        """The cached boto3 S3 client for these details (created on first use)."""
        cache_key = (details.endpoint_url, details.region_name, details.access_key_id, details.secret_access_key)
        with self._lock:
            cached = self._clients.get(cache_key)
            if cached is not None:
                self._clients.move_to_end(cache_key)
                return cached
            created = self._make_client(details)
            self._clients[cache_key] = created
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
            return created

    def _make_client(self, details: S3Details):
        options: dict = {
            # total_max_attempts counts the first try; plain max_attempts would add one more
            "retries": {"total_max_attempts": self.attempts, "mode": "standard"},
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
        }
        if details.endpoint_url:
            options["s3"] = {"addressing_style": "path"}
            # botocore >= 1.36 adds CRC checksums by default, which GCS, R2 and many
            # S3-compatible servers reject; send them only where the operation requires one
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        import boto3  # here, not at import: boto3 is needed only where S3 is used
        import botocore.config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=details.endpoint_url,
            region_name=details.region_name or "us-east-1",
            aws_access_key_id=details.access_key_id,
            aws_secret_access_key=details.secret_access_key,
            config=botocore.config.Config(**options),
        )

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - best effort  # pragma: no cover
                pass

    # -- operations ------------------------------------------------------------------------
    def upload(self, details: S3Details, name: str, data: bytes, content_type: str = "image/png") -> str:
        """Put ``data`` at ``prefix/name``, confirm its size with a HEAD, return its public URL.
        Raises UploadError when it fails after all attempts, ValueError for an unsafe name."""
        key = details.key_for(name)
        body = bytes(data)
        try:
            s3 = self.client(details)
            s3.put_object(Bucket=details.bucket, Key=key, Body=body, ContentType=content_type)
            head = s3.head_object(Bucket=details.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one safe message
            raise UploadError(
                f"Upload to s3://{details.bucket}/{key} failed: {_reason(exc, details)}", transient=_unreachable(exc)
            ) from None
        stored = head.get("ContentLength")
        if stored != len(body):
            raise UploadError(
                f"Upload to s3://{details.bucket}/{key} failed: verification found {stored} bytes, sent {len(body)}",
                transient=True,
            )
        return details.url_for(name)

    def delete(self, details: S3Details, name: str) -> bool:
        """Best effort: True if the delete call succeeded, False on any failure."""
        try:
            self.client(details).delete_object(Bucket=details.bucket, Key=details.key_for(name))
            return True
        except Exception:  # noqa: BLE001
            return False

    def check(self, details: S3Details) -> None:
        """A cheap HEAD on the bucket: raises UploadError saying what is wrong."""
        try:
            self.client(details).head_bucket(Bucket=details.bucket)
        except Exception as exc:  # noqa: BLE001
            raise UploadError(
                f"S3 check of bucket {details.bucket!r} at {details.where()} failed: {_reason(exc, details, bucket=True)}",
                transient=_unreachable(exc),
            ) from None


def _unreachable(exc: BaseException) -> bool:
    """The store could not be reached, timed out, or answered 5xx / slow down: a retry later may
    work. A refusal (4xx: no bucket, access denied, bad request) will not."""
    try:
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError
    except ImportError:
        return False
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str((exc.response.get("Error", {}) or {}).get("Code") or "")
        return status >= 500 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout", "InternalError")
    return isinstance(exc, (ConnectionError, HTTPClientError))


def _reason(exc: BaseException, details: S3Details, bucket: bool = False) -> str:
    """A short, credential-free account of a boto3 failure."""
    try:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )
    except ImportError:  # no botocore: the failure is not one of its errors (e.g. boto3 is missing)
        return _scrub(type(exc).__name__ + (f": {exc}" if str(exc) else ""), details)
    where = details.where()
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {}) or {}
        code = str(error.get("Code") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = str(error.get("Message") or "")
        if code in ("404", "NoSuchBucket") or (bucket and status == 404):
            text = f"bucket {details.bucket!r} does not exist"
        elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            text = "access denied: check aws_access_key_id, aws_secret_access_key and the bucket's permissions"
            if code not in ("", "403"):
                text += f" ({code})"
        elif code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed") or status == 301:
            text = "the bucket is in another region: check region_name and endpoint_url"
        elif code == "400" or (status == 400 and not message):
            text = "bad request: check region_name and endpoint_url"
        else:
            text = f"{code or 'error'} (HTTP {status})" + (f": {message}" if message else "")
    elif isinstance(exc, EndpointConnectionError):
        text = f"could not connect to {where}"
    elif isinstance(exc, ConnectTimeoutError):
        text = f"connection to {where} timed out"
    elif isinstance(exc, ReadTimeoutError):
        text = f"no response from {where} in time"
    elif isinstance(exc, BotoCoreError):
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = type(exc).__name__ + (f": {exc}" if str(exc) else "")
    return _scrub(text, details)


def _scrub(text: str, details: S3Details, limit: int = 300) -> str:
    for secret in (details.secret_access_key, details.access_key_id):
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class S3Storage:
    """One bucket (and prefix) as a ``storage.base.Storage``: uploads verified and retried by the
    shared ``S3Uploader``; URLs are ``public_url/name``."""

    def __init__(self, details: S3Details, uploader: S3Uploader):
        self.details = details
        self.uploader = uploader

    def save(self, name: str, data: bytes, content_type: str = "image/png") -> str:
        return self.uploader.upload(self.details, name, data, content_type)

    def url_for(self, name: str) -> str:
        return self.details.url_for(name)

    def read(self, name: str) -> bytes:
        try:
            answer = self.uploader.client(self.details).get_object(Bucket=self.details.bucket, Key=self.details.key_for(name))
            return answer["Body"].read()
        except Exception as exc:  # noqa: BLE001 - missing or unreachable: the caller treats both alike
            raise FileNotFoundError(f"s3://{self.details.bucket}/{self.details.key_for(name)}: "
                                    f"{_reason(exc, self.details)}") from None

    def check(self) -> None:
        self.uploader.check(self.details)

    def delete(self, name: str) -> None:
        self.uploader.delete(self.details, name)
