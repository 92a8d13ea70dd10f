"""All configuration in one place: environment variables with the FLUXSERVE_ prefix,
overridable by CLI flags. Paths left unset are derived from ``data_dir``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUXSERVE_", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Holds the SQLite file, inputs, outputs, tiny models.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite file in data_dir.")
    host: str = "127.0.0.1"
    port: int = 8000
    public_base_url: str | None = Field(
        None, description="Base of the URLs handed to clients (set it behind a proxy)."
    )
    models: Literal["real", "tiny"] = "real"
    model_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='JSON, e.g. {"flux-kontext-dev": {"source": "/models/kontext", "steps": 24}}.',
    )
    device: str = Field("auto", description="auto | cuda | cuda:N | cpu")
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
    compile_warm_sizes: list[int] = Field(default_factory=lambda: [512, 1024], description="Sizes warmed at load when compiling.")
    max_batch_size: int = Field(1, ge=1, le=16, description="Compatible text-to-image jobs run in one call (1: off).")
    batch_wait_seconds: float = Field(0.02, ge=0, le=1, description="How long a batch waits for companions.")
    sync_wait_seconds: float = Field(
        30.0, ge=0, description="How long a request waits for its job before answering processing."
    )
    nsfw_threshold: float = Field(0.5, ge=0, le=1, description="NSFW score at or above which an image is blanked.")
    max_init_image_bytes: int = 20 * 1024 * 1024
    init_image_timeout_seconds: float = 20.0
    max_job_attempts: int = Field(3, ge=1, description="Tries per job before it is marked failed.")
    worker: Literal["process", "thread"] = Field(
        "process", description="process: the GPU worker runs in a child process the server restarts if it dies."
    )
    lease_seconds: float = Field(15.0, gt=0, description="A running job whose worker is silent this long is retried.")
    heartbeat_seconds: float = Field(2.0, gt=0, description="How often a worker confirms it is alive.")
    max_queued_per_key: int = Field(10, ge=1, description="Queued jobs per key before new ones get 429.")
    retention_seconds: float = Field(86400.0, gt=0, description="Local images are deleted this long after they are made.")
    janitor_interval_seconds: float = Field(60.0, gt=0, description="How often expired files are looked for.")
    webhook_retry_seconds: float = Field(86400.0, gt=0, description="How long a failing webhook is retried.")
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="Connect/read timeout of one webhook POST.")
    max_body_bytes: int = Field(48 * 1024 * 1024, gt=0, description="Largest request body (data: URIs included).")
    body_timeout_seconds: float = Field(30.0, gt=0, description="Time a client gets to send its whole body.")
    rate_limit_per_key: str = Field("600/minute", description='Requests per key ("" for none), limits syntax.')
    rate_limit_per_address: str = Field("1200/minute", description="Requests per client address under /api/.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS (off when empty).")
    fetch_allow: list[str] = Field(
        default_factory=list,
        description='Hosts or CIDRs that init images and webhooks may reach although private, e.g. ["10.0.0.0/8"].',
    )

    secret_key: str | None = Field(
        None, description="Encrypts stored S3 secrets; default: generated once into data_dir/secret.key."
    )
    s3_default: dict[str, Any] | None = Field(
        None, description="Server-wide bucket, update_s3 fields as JSON: public_url, endpoint_url, region_name, "
        "aws_access_key_id, aws_secret_access_key, image_directory (or bucket).",
    )
    s3_upload_attempts: int = Field(3, ge=1, description="Tries per image upload before the job fails.")
    enhance_openai_base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint for enhance_prompt (default: the klein Qwen3 encoder)."
    )
    enhance_openai_model: str = "gpt-4o-mini"
    enhance_openai_api_key: str | None = None
    enhance_timeout_seconds: float = Field(10.0, gt=0, description="Bound on one prompt enhancement.")
    enhance_max_new_tokens: int = Field(120, ge=1, le=512)

    def fetch_policy(self, max_bytes: int | None = None):
        from fluxserve.fetching import FetchPolicy

        return FetchPolicy(
            allow=tuple(self.fetch_allow), max_bytes=max_bytes or self.max_init_image_bytes,
            connect_timeout=min(5.0, self.init_image_timeout_seconds), read_timeout=self.init_image_timeout_seconds,
        )

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

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
