"""All configuration in one place: environment variables with the FLUXSERVE_ prefix,
overridable by CLI flags. Paths left unset are derived from ``data_dir``.

Every free-text setting is checked here, when the settings are built (``serve`` builds them
before it starts anything, ``update_server`` before it changes anything): a typo is a
``pydantic.ValidationError`` naming the field (:func:`settings_problems` turns it into one line
per problem naming the variable), never a worker that fails at start and is restarted forever.
The checks use the engine's own parsers from torch-free modules (``engine.switches``,
``units``, ``models``, ``fetching``): the HTTP process never imports torch.

JSON settings (``model_overrides``, ``s3_default``, ``compile_warm_sizes``, ``cors_origins``,
``fetch_allow``) are decoded here rather than by pydantic-settings, so that bad JSON is reported
like any other problem; an empty variable means the default.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fluxserve.engine.switches import Optimizations
from fluxserve.loras import check_hub_id
from fluxserve.models import Registry, UnknownModel
from fluxserve.units import parse_bytes

ENV_PREFIX = "FLUXSERVE_"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(?::\d+)?")
MAX_WARM_SIZE = 2048
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    data_dir: Path = Field(Path("data"), description="Holds the SQLite file, inputs, outputs, tiny models.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite file in data_dir.")
    host: str = Field("127.0.0.1", description="Bind address (0.0.0.0: every interface).")
    port: int = Field(8000, description="Port to listen on.")
    public_base_url: str | None = Field(
        None, description="Base of the URLs handed to clients (set it behind a proxy)."
    )
    models: Literal["real", "tiny"] = Field(
        "real", description="real: the diffusers weights; tiny: offline random-weight pipelines (tests, laptops).")
    model_overrides: Annotated[dict[str, dict[str, Any]], NoDecode] = Field(
        default_factory=dict,
        description='JSON, e.g. {"flux-kontext-dev": {"source": "/models/kontext", "steps": 24}}.',
    )
    device: str = Field("auto", description="auto | cuda | cuda:N | cpu | mps")
    gpu_memory_budget: str = Field(
        "auto", description='Bytes of accelerator memory for model weights ("auto", "20GiB", ...); LRU eviction beyond.'
    )
    offload: Literal["none", "model", "sequential"] = Field(
        "none", description="CPU offload for small GPUs: model (per component) or sequential (per layer, slowest)."
    )
    optimizations: str = Field(
        "", description='Engine switches on top of the defaults, e.g. "compile,fp8,attention=_native_cudnn" '
        '(defaults: bf16 on CUDA, truncated Qwen3, prompt cache, channels_last VAE, best attention); "none" for none.'
    )
    compile_warm_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [512, 1024], description="Sizes warmed at load when compiling.")
    max_batch_size: int = Field(1, ge=1, le=16, description="Compatible text-to-image jobs run in one call (1: off).")
    batch_wait_seconds: float = Field(0.02, ge=0, le=1, description="How long a batch waits for companions.")
    sync_wait_seconds: float = Field(
        30.0, ge=0, description="How long a request waits for its job before answering processing."
    )
    openai_wait_seconds: float = Field(
        300.0, ge=0, description="How long an OpenAI Images API request (/v1/images/...) waits for its images "
        "before answering 504 with the request id (OpenAI clients expect the images in the answer)."
    )
    base64_inline: bool = Field(
        False, description="base64 answers as inline strings in output; default: ModelsLab's way, the URLs of "
        ".base64 text files (the PNG links stay in proxy_links).")
    idempotent_track_id: bool = Field(
        False, description="Treat a request's track_id as its Idempotency-Key when it sends none (for clients that "
        "can't send headers): the same track_id again answers the first job.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: readable lines; json: one JSON object per line (time, level, name, process, message).")
    nsfw_threshold: float = Field(0.5, ge=0, le=1, description="NSFW score at or above which an image is blanked.")
    max_init_image_bytes: int = Field(20 * 1024 * 1024, description="Largest init image (download or upload).")
    init_image_timeout_seconds: float = Field(20.0, description="Init image download timeout.")
    max_job_attempts: int = Field(3, ge=1, description="Tries per job before it is marked failed.")
    worker: Literal["process", "thread"] = Field(
        "process", description="process: the GPU worker runs in a child process the server restarts if it dies."
    )
    run_worker: bool = Field(
        True, description="serve only: host the GPU workers in this server (false: the API, webhooks and janitor "
        "alone; `fluxserve worker` processes elsewhere, on the same PostgreSQL, generate).")
    gpus: str = Field(
        "all", description='GPUs to run one worker process each on: "all" (every visible GPU; one worker when there '
        'is none) or indices such as "0,2". Each process sees only its GPU (CUDA_VISIBLE_DEVICES).')
    worker_host: str = Field(
        "127.0.0.1", description="fluxserve worker: bind address of its /health and /metrics port (0.0.0.0 in containers).")
    worker_port: int = Field(9100, ge=1, le=65535, description="fluxserve worker: port of /health and /metrics.")
    pod_deletion_cost: Literal["auto", "off"] = Field(
        "auto", description="fluxserve worker on Kubernetes: keep the pod's controller.kubernetes.io/pod-deletion-cost "
        "annotation at the number of jobs in hand, so that scale-in removes idle pods first (auto: on when "
        "FLUXSERVE_POD_NAME and an API server (KUBERNETES_SERVICE_HOST) are known; needs RBAC: patch pods).")
    pod_name: str | None = Field(
        None, description="The worker's own pod name (the downward API's metadata.name), for the pod deletion cost.")
    pod_namespace: str | None = Field(
        None, description="The worker's pod namespace (downward API's metadata.namespace); default: the service "
        "account's namespace file.")
    kubernetes_api_url: str | None = Field(
        None, description="The Kubernetes API server; default https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT "
        "(in-cluster).")
    kubernetes_serviceaccount_dir: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount"),
        description="Folder of the pod's service-account token, ca.crt and namespace files.")
    worker_models: Annotated[list[str] | None, NoDecode] = Field(
        None, description="The model group this server's workers claim jobs for: comma-separated model names "
        "(aliases allowed); unset: every model.")
    affinity_seconds: float = Field(
        30.0, ge=0, description="A worker prefers jobs for the models it holds loaded unless a job for another "
        "model has waited this long (no model swap per job; no starvation).")
    lease_seconds: float = Field(15.0, gt=0, description="A running job whose worker is silent this long is retried.")
    heartbeat_seconds: float = Field(2.0, gt=0, description="How often a worker confirms it is alive.")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT, how long the worker may spend finishing the job (or batch) in hand "
        "before it goes back to the queue.")
    max_queued_per_key: int = Field(10, ge=1, description="Queued jobs per key before new ones get 429.")
    retention_seconds: float = Field(86400.0, gt=0, description="Local images are deleted this long after they are made.")
    janitor_interval_seconds: float = Field(60.0, gt=0, description="How often expired files are looked for.")
    webhook_retry_seconds: float = Field(86400.0, gt=0, description="How long a failing webhook is retried.")
    webhook_timeout_seconds: float = Field(
        30.0, gt=0, description="Time one webhook POST gets in all, connect to answer (receivers answer within it).")
    webhook_concurrency: int = Field(16, ge=1, le=512, description="Webhook POSTs in flight at once (threads).")
    webhook_per_host: int = Field(
        4, ge=1, le=512, description="Webhook POSTs in flight to one receiver (scheme://host[:port]) at once.")
    max_body_bytes: int = Field(48 * 1024 * 1024, gt=0, description="Largest request body (data: URIs included).")
    body_timeout_seconds: float = Field(30.0, gt=0, description="Time a client gets to send its whole body.")
    rate_limit_per_key: str = Field("600/minute", description='Requests per key ("" for none), limits syntax.')
    rate_limit_per_address: str = Field("1200/minute", description="Requests per client address under /api/.")
    redis_url: str | None = Field(
        None, description="Redis (redis://host:6379/0, rediss://..., redis+unix:///path) holding the rate limits' "
        "counters, so that they hold across API replicas; unset: in memory, per process.")
    outputs_from_bucket: Literal["proxy", "redirect"] = Field(
        "proxy", description="GET /outputs/<name> on a replica without the file, with a server-wide bucket: proxy (the "
        "replica sends the object's bytes) or redirect (302 to a presigned URL valid 15 minutes).")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (off when empty).")
    fetch_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='Hosts or CIDRs that init images and webhooks may reach although private, e.g. ["10.0.0.0/8"].',
    )

    secret_key: str | None = Field(
        None, description="Encrypts stored S3 secrets; default: generated once into data_dir/secret.key."
    )
    s3_default: Annotated[dict[str, Any] | None, NoDecode] = Field(
        None, description="Server-wide bucket, update_s3 fields as JSON: public_url, endpoint_url, region_name, "
        "aws_access_key_id, aws_secret_access_key, image_directory (or bucket).",
    )
    s3_upload_attempts: int = Field(3, ge=1, description="Tries per image upload before the job fails.")
    enhance_openai_base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint for enhance_prompt (default: the klein Qwen3 encoder)."
    )
    enhance_openai_model: str = Field("gpt-4o-mini", description="Model asked at FLUXSERVE_ENHANCE_OPENAI_BASE_URL.")
    enhance_openai_api_key: str | None = Field(None, description="API key for FLUXSERVE_ENHANCE_OPENAI_BASE_URL.")
    enhance_timeout_seconds: float = Field(10.0, gt=0, description="Bound on one prompt enhancement.")
    enhance_max_new_tokens: int = Field(120, ge=1, le=512, description="Longest prompt rewrite, in tokens.")
    lora_dir: Path | None = Field(
        None, description="LoRA adapters requests may name (lora_model): <name>.safetensors or a folder <name>/ holding one; "
        "default data_dir/loras.")
    lora_hub_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description='Hub LoRA repos requests may name, e.g. ["org/repo", "org/repo:file.safetensors"] '
        "(loaded through the Hugging Face cache; never URLs).")
    lora_max_loaded: int = Field(8, ge=1, le=64, description="LoRA adapters kept loaded per model (least recently used dropped).")

    def fetch_policy(self, max_bytes: int | None = None):
        from fluxserve.fetching import FetchPolicy

        return FetchPolicy(
            allow=tuple(self.fetch_allow), max_bytes=max_bytes or self.max_init_image_bytes,
            connect_timeout=min(5.0, self.init_image_timeout_seconds), read_timeout=self.init_image_timeout_seconds,
        )

    def s3_default_details(self):
        """The server-wide bucket as ``storage.s3.S3Details``, or None when unset."""
        return _s3_details(self.s3_default) if self.s3_default else None

    # -- checks (each raises ValueError with a message for the operator) --------------------

    @field_validator("model_overrides", "s3_default", "compile_warm_sizes", "cors_origins", "fetch_allow", mode="before")
    @classmethod
    def _decode_json(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        if not value.strip():
            assert info.field_name is not None  # always set for a field validator
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None

    @field_validator("gpus")
    @classmethod
    def _check_gpus(cls, value: str) -> str:
        from fluxserve.gpus import parse_gpus

        parse_gpus(value)
        return value.strip().lower()

    @field_validator("worker_models", mode="before")
    @classmethod
    def _split_worker_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = [name.strip() for name in value.split(",") if name.strip()]
            return names or None
        return value

    @field_validator("worker_models")
    @classmethod
    def _check_worker_models(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        """Registry names (aliases become their model's name); an unknown name is refused with the known ones."""
        if value is None:
            return None
        registry = Registry.build(info.data.get("model_overrides") or {})
        names: list[str] = []
        for name in value:
            try:
                canonical = registry.get(name).name
            except UnknownModel:
                raise ValueError(f"unknown model {name!r}; known: {', '.join(registry.names())}") from None
            if canonical not in names:
                names.append(canonical)
        return names

    @field_validator("public_base_url")
    @classmethod
    def _check_public_base_url(cls, value: str | None) -> str | None:
        if not value:
            return value
        _http_url_parts(value, "a http(s) URL such as https://images.example.com (a path is allowed)")
        return value.rstrip("/")

    @field_validator("pod_name", "pod_namespace")
    @classmethod
    def _check_pod_names(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value:
            return None
        # a pod name is a DNS subdomain (253 characters), a namespace a DNS label (63)
        pattern, longest = (_DNS_SUBDOMAIN, 253) if info.field_name == "pod_name" else (_DNS_LABEL, 63)
        if len(value) > longest or not pattern.fullmatch(value):
            raise ValueError(f"{value!r} is not a Kubernetes {'pod' if info.field_name == 'pod_name' else 'namespace'} "
                             f"name (lower-case letters, digits and '-', at most {longest} characters)")
        return value

    @field_validator("kubernetes_api_url")
    @classmethod
    def _check_kubernetes_api_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        _http_url_parts(value, "https://host:port")
        return value.strip().rstrip("/")

    @field_validator("optimizations")
    @classmethod
    def _check_optimizations(cls, value: str) -> str:
        """The engine's own grammar (``Optimizations.from_strings``): unknown switch names and bad
        values are refused with the known names. Attention backends are checked for their form
        only: which names diffusers knows cannot be asked without importing diffusers, hence
        torch, which the HTTP process never does; the engine reports a well-formed unknown
        backend as unavailable (with the known names) and goes on without it."""
        Optimizations.from_strings(value)
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        device = value.strip().lower()
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda, cuda:N (e.g. cuda:1) or mps")
        return device

    @field_validator("gpu_memory_budget")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        parse_bytes(value)  # the parser the engine uses
        return value

    @field_validator("model_overrides")
    @classmethod
    def _check_overrides(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        Registry.build(value)  # its checks: known models, overridable fields, their types
        return value

    @field_validator("s3_default")
    @classmethod
    def _check_s3_default(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            _s3_details(value)  # builds the details only: connects nowhere
        return value

    @field_validator("fetch_allow")
    @classmethod
    def _check_fetch_allow(cls, value: list[str]) -> list[str]:
        from fluxserve.fetching import FetchPolicy

        FetchPolicy.from_strings(value)  # each entry a host name or an IP address / CIDR
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin == "*":
                continue
            parts = _http_url_parts(origin, "an origin such as https://app.example.com[:port], or *", what="origin")
            if parts.path:
                raise ValueError(f"origin {origin!r} must not have a path (not even a trailing /): browsers send scheme://host[:port]")
        return value

    @field_validator("rate_limit_per_key", "rate_limit_per_address")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        if value:
            from limits import parse

            try:
                parse(value)
            except ValueError:
                raise ValueError(f"not a rate limit: {value!r} (e.g. 600/minute, 10/second; \"\" for none)") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        scheme = urlsplit(value.strip()).scheme.lower()
        if scheme not in ("redis", "rediss", "redis+unix"):
            raise ValueError(f"not a Redis URL: {scheme or 'no'} scheme (expected redis://, rediss:// or redis+unix://)")
        return value.strip()

    @field_validator("compile_warm_sizes")
    @classmethod
    def _check_warm_sizes(cls, value: list[int]) -> list[int]:
        for size in value:
            if not 8 <= size <= MAX_WARM_SIZE or size % 8:
                raise ValueError(f"warm size {size} must be a multiple of 8 from 8 to {MAX_WARM_SIZE}")
        return value

    @field_validator("lora_hub_ids", mode="before")
    @classmethod
    def _decode_lora_hub_ids(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if not value.strip():
            return []
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc}); expected e.g. [\"org/repo\"]") from None

    @field_validator("lora_hub_ids")
    @classmethod
    def _check_lora_hub_ids(cls, value: list[str]) -> list[str]:
        return [check_hub_id(entry) for entry in value]

    @property
    def lora_folder(self) -> Path:
        return self.lora_dir or self.data_dir / "loras"

    @property
    def tiny_loras_dir(self) -> Path:
        """The tiny random-weight demo adapters (``--models tiny`` only), beside the tiny models."""
        return self.tiny_models_dir / "loras"

    @property
    def base_url(self) -> str:
        return self.public_base_url or f"http://{self.host}:{self.port}"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'fluxserve.db').resolve()}"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def inputs_dir(self) -> Path:
        return self.data_dir / "inputs"

    @property
    def tiny_models_dir(self) -> Path:
        return self.data_dir / "tiny-models"


def _http_url_parts(value: str, expected: str, what: str = "URL"):
    """``urlsplit(value)`` when it is a http(s) URL with a host and no credentials, query or fragment."""
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"{what} {value!r} is not valid; expected {expected}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} {value!r} is not valid; expected {expected}")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{what} {value!r} must not have credentials, a query or a fragment")
    return parts


def _s3_details(fields: dict[str, Any]):
    """``S3Details.from_modelslab`` for the update_s3 fields of ``s3_default`` (which connects
    nowhere), with unknown, missing and non-text fields named instead of a TypeError."""
    from fluxserve.storage.s3 import S3Details

    accepted = inspect.signature(S3Details.from_modelslab).parameters
    unknown = sorted(set(fields) - set(accepted))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; accepted: {', '.join(accepted)}")
    missing = sorted(name for name, p in accepted.items() if p.default is inspect.Parameter.empty and name not in fields)
    if missing:
        raise ValueError(f"missing fields {missing}")
    not_text = sorted(name for name, v in fields.items() if v is not None and not isinstance(v, str))
    if not_text:
        raise ValueError(f"fields {not_text} must be strings")
    return S3Details.from_modelslab(**{"image_directory": "", **fields})


#: what a setting left unset means, where that is not one fixed value
DERIVED_DEFAULTS = {
    "database_url": "sqlite:///<data_dir>/fluxserve.db",
    "public_base_url": "http://<host>:<port>",
    "secret_key": "generated once into <data_dir>/secret.key",
    "lora_dir": "<data_dir>/loras",
    "pod_namespace": "the service account's namespace file",
    "kubernetes_api_url": "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT",
}


def default_text(field: str) -> str:
    """A setting's default as the environment would spell it (JSON for lists and objects)."""
    if field in DERIVED_DEFAULTS:
        return DERIVED_DEFAULTS[field]
    value = Settings.model_fields[field].get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value) if str(value) else '""'


def settings_help() -> str:
    """Every setting, one Markdown paragraph each: its variable, default and meaning (``serve
    --help`` shows it; built from ``Settings``, so it can't drift)."""
    lines = ["**Settings** (environment variables; the flags above override them; FLUXSERVE_ENV_FILE: "
             "a file of such lines):"]
    for field, info in Settings.model_fields.items():
        meaning = (info.description or "").strip().replace("<", "&lt;")  # not an HTML tag to Markdown
        lines.append(f"`{env_name(field)}` (default `{default_text(field)}`){': ' + meaning if meaning else ''}")
    return "\n\n".join(lines)


def env_name(field: str) -> str:
    """The environment variable of a settings field: ``optimizations`` -> ``FLUXSERVE_OPTIMIZATIONS``."""
    return ENV_PREFIX + field.upper()


def settings_problems(error: ValidationError, flags: Iterable[str] = ()) -> list[str]:
    """One line per problem, naming the variable and, for the fields in ``flags``, the command's
    flag: ``FLUXSERVE_PORT (--port): Input should be a valid integer``. Values are not repeated
    (``s3_default`` holds a secret key)."""
    flags = set(flags)
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        field, *inside = item["loc"] or ("?",)
        name = env_name(str(field)) + (f" (--{str(field).replace('_', '-')})" if field in flags else "")
        where = "".join(f"[{part}]" if isinstance(part, int) else f"[{part!r}]" for part in inside)
        cause = (item.get("ctx") or {}).get("error")
        message = str(cause) if item["type"] == "value_error" and cause is not None else item["msg"]
        lines.append(f"{name}: {where + ': ' if where else ''}{message}")
    return lines

