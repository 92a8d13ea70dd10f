"""The ``fluxserve`` command: serve, generate, doctor, keys, models."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from fluxserve.config import Settings, settings_help, settings_problems
from fluxserve.logs import configure as configure_logging

# markdown: the settings list below has code spans, and option help like "[env FLUXSERVE_HOST]" is
# shown as written (rich markup took it for a style tag and dropped it)
app = typer.Typer(help="fluxserve: self-hosted image generation that speaks the ModelsLab API.", no_args_is_help=True,
                  rich_markup_mode="markdown")
keys_app = typer.Typer(help="Manage API keys (stored hashed).", no_args_is_help=True)
models_app = typer.Typer(help="Inspect the model registry, download weights, build the tiny offline models.",
                         no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")

DataDir = Annotated[Path | None, typer.Option(help="Data directory [env FLUXSERVE_DATA_DIR].")]
DatabaseUrl = Annotated[str | None, typer.Option(help="SQLAlchemy URL [env FLUXSERVE_DATABASE_URL].")]


def _load_settings(env_file: Path | None = None, **overrides) -> Settings:
    """Flags over environment over the env file (FLUXSERVE_ENV_FILE) over defaults; raises
    ValidationError for a refused setting."""
    chosen: Path | str | None = env_file or os.environ.get("FLUXSERVE_ENV_FILE") or None
    given = {name: value for name, value in overrides.items() if value is not None}
    return Settings(_env_file=chosen, **given) if chosen else Settings(**given)


def _settings(env_file: Path | None = None, *, flags: Any = None, **overrides) -> Settings:
    """:func:`_load_settings` for a command: a refused setting ends it before it does anything,
    with one line per problem naming the variable (and the flag, ``flags`` being the fields set
    by a flag of the same name, by default every one of ``overrides``) on stderr, and status 2."""
    try:
        return _load_settings(env_file, **overrides)
    except ValidationError as exc:
        for line in settings_problems(exc, flags=overrides if flags is None else flags):
            typer.echo(line, err=True)
    except SettingsError as exc:  # a source pydantic-settings could not read at all
        typer.echo(f"configuration: {exc}", err=True)
    raise typer.Exit(2)


def _key_store(data_dir: Path | None, database_url: str | None):
    from fluxserve.jobs.database import open_database
    from fluxserve.keys import KeyStore

    settings = _settings(data_dir=data_dir, database_url=database_url)
    return KeyStore(open_database(settings.resolved_database_url))


@app.command(epilog=settings_help())  # every setting with its default, from Settings
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env FLUXSERVE_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env FLUXSERVE_PORT].")] = None,
    models: Annotated[str | None, typer.Option(help="real | tiny [env FLUXSERVE_MODELS].")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    public_base_url: Annotated[str | None, typer.Option(help="Base of returned URLs [env FLUXSERVE_PUBLIC_BASE_URL].")] = None,
    worker: Annotated[str | None, typer.Option(help="process | thread [env FLUXSERVE_WORKER].")] = None,
    run_worker: Annotated[bool | None, typer.Option(
        "--run-worker/--no-worker",
        help="Host the GPU workers here (default), or not: the API, webhooks and janitor alone; `fluxserve worker` "
             "processes on the same PostgreSQL generate [env FLUXSERVE_RUN_WORKER].")] = None,
    gpus: Annotated[str | None, typer.Option(help="all | 0,2: one worker process per GPU [env FLUXSERVE_GPUS].")] = None,
    env_file: Annotated[
        Path | None, typer.Option(help="Settings file re-read by update_server [env FLUXSERVE_ENV_FILE].")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Run the API server with its GPU workers, one per GPU (embedded default: SQLite + local
    disk), or without them (--no-worker). SIGTERM or Ctrl+C stops it gracefully (no new jobs; the
    running ones get FLUXSERVE_SHUTDOWN_GRACE_SECONDS to finish, else go back to the queue); a
    second one stops it at once."""
    flags = dict(host=host, port=port, models=models, data_dir=data_dir, database_url=database_url,
                 public_base_url=public_base_url, worker=worker, run_worker=run_worker, gpus=gpus)
    settings = _settings(env_file, **flags)  # first: a refused setting starts nothing

    from fluxserve.runtime import build_server_app
    from fluxserve.serving import run_server

    configure_logging(log_level, settings.log_format)
    # update_server reports a refused setting itself (400, nothing changed)
    app_ = build_server_app(settings, reload_settings=lambda: _load_settings(env_file, **flags))
    if not _key_store(settings.data_dir, settings.database_url).list():
        logging.getLogger("fluxserve").warning("no API keys yet: create one with `fluxserve keys create NAME`")
    run_server(app_, settings, log_level)  # SIGTERM/SIGINT: a graceful stop (see fluxserve.serving)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw (or, with --init-image, how to change it).")],
    model: Annotated[str | None, typer.Option(help="A served model name or alias (default: the path's own).")] = None,
    init_image: Annotated[list[str] | None, typer.Option(
        help="Image to start from: a file (sent as base64) or an http(s) URL; repeat for several references.")] = None,
    mask: Annotated[str | None, typer.Option(help="Inpainting mask (white repaints): a file or a URL.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the first image (image i uses seed + i).")] = None,
    samples: Annotated[int, typer.Option(help="Images to make (1-4).")] = 1,
    width: Annotated[int | None, typer.Option(help="Width in pixels.")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the model's).")] = None,
    strength: Annotated[float | None, typer.Option(help="How far to move from the init image (0-1).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale.")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="What to avoid (models that take one).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs.")] = Path("."),
    url: Annotated[str, typer.Option(envvar="FLUXSERVE_URL", help="The server [env FLUXSERVE_URL].")] = "http://127.0.0.1:8000",
    key: Annotated[str | None, typer.Option(envvar="FLUXSERVE_KEY", help="API key [env FLUXSERVE_KEY].")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the images.")] = 600.0,
) -> None:
    """Generate images on a running server: text to image, image to image (--init-image) or
    inpainting (--init-image and --mask). Shows the queue position and the steps as they happen,
    saves the PNGs as <request id>-<n>.png in --out and prints their paths."""
    from fluxserve.cli_display import progress_view
    from fluxserve.client.generate import ClientError, GenerateRequest
    from fluxserve.client.generate import generate as run_generate

    request = GenerateRequest(prompt=prompt, model=model, init_images=list(init_image or []), mask=mask, seed=seed,
                              samples=samples, width=width, height=height, steps=steps, strength=strength,
                              guidance=guidance, negative_prompt=negative_prompt)
    try:
        saved = run_generate(request, base_url=url, key=key or "", out_dir=out, view=progress_view(), timeout=timeout)
    except ClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for path in saved:
        typer.echo(str(path))


@app.command()
def doctor(
    models: Annotated[str | None, typer.Option(help="real | tiny [env FLUXSERVE_MODELS].")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    env_file: Annotated[Path | None, typer.Option(help="Settings file [env FLUXSERVE_ENV_FILE].")] = None,
) -> None:
    """Check this machine for serving: Python and torch, GPU and driver, memory for the models,
    disk, database, object storage, fetch policy, settings. One line each (OK, WARN or FAIL, what,
    the detail or the fix); exit status 1 if any FAIL."""
    from fluxserve.doctor import run_checks

    flags = dict(models=models, data_dir=data_dir, database_url=database_url)
    settings, problems = None, []
    try:
        settings = _load_settings(env_file, **flags)
    except ValidationError as exc:
        problems = settings_problems(exc, flags=flags)
    except SettingsError as exc:
        problems = [f"configuration: {exc}"]
    failed = False
    for check in run_checks(settings, problems):
        typer.echo(check.line())
        failed = failed or check.level == "FAIL"
    if failed:
        raise typer.Exit(1)


@app.command()
def worker(
    gpus: Annotated[str | None, typer.Option(help="all | 0,2: one worker process per GPU [env FLUXSERVE_GPUS].")] = None,
    models: Annotated[str | None, typer.Option(help="real | tiny [env FLUXSERVE_MODELS].")] = None,
    worker_models: Annotated[str | None, typer.Option(
        help="The model group claimed: model names, comma-separated; default every model [env FLUXSERVE_WORKER_MODELS].",
    )] = None,
    host: Annotated[str | None, typer.Option(help="Bind address of /health and /metrics [env FLUXSERVE_WORKER_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port of /health and /metrics [env FLUXSERVE_WORKER_PORT].")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    mode: Annotated[str | None, typer.Option(help="process | thread [env FLUXSERVE_WORKER].")] = None,
    env_file: Annotated[Path | None, typer.Option(help="Settings file [env FLUXSERVE_ENV_FILE].")] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Run GPU workers alone, one process per GPU, claiming jobs from the shared database (use
    PostgreSQL: the API runs elsewhere, `fluxserve serve --no-worker`). No public API: GET /health
    and GET /metrics on FLUXSERVE_WORKER_HOST:FLUXSERVE_WORKER_PORT (127.0.0.1:9100). SIGTERM stops
    it gracefully like serve."""
    overrides = dict(gpus=gpus, models=models, worker_models=worker_models, worker_host=host, worker_port=port,
                     data_dir=data_dir, database_url=database_url, worker=mode)
    settings = _settings(env_file, flags={"gpus", "models", "worker_models", "data_dir", "database_url"}, **overrides)

    from fluxserve.worker_service import run_worker_service

    configure_logging(log_level, settings.log_format)
    if settings.resolved_database_url.startswith("sqlite"):
        logging.getLogger("fluxserve").warning(
            "this worker's database is SQLite (%s): only a server on this machine, with the same data folder, "
            "sees its jobs; set FLUXSERVE_DATABASE_URL to the PostgreSQL the API uses", settings.resolved_database_url)
    run_worker_service(settings, log_level)  # SIGTERM/SIGINT: a graceful stop (see fluxserve.serving)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A label for the key, e.g. the team using it.")],
    admin: Annotated[bool, typer.Option("--admin", help="Admin key (enterprise admin endpoints).")] = False,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    row, plaintext = _key_store(data_dir, database_url).create(name, admin=admin)
    typer.echo(plaintext)
    typer.echo(f"created key {row.id} ({row.name}{', admin' if admin else ''}); it is shown only now. "
               f"Webhook signing secret: fluxserve keys webhook-secret {row.id}", err=True)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """List keys: id, prefix, name, role, state."""
    for row in _key_store(data_dir, database_url).list():
        state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
        role = "admin" if row.is_admin else "user"
        typer.echo(f"{row.id}\t{row.prefix}…\t{row.name}\t{role}\t{state}\tcreated {row.created_at:%Y-%m-%d %H:%M}")


@keys_app.command("webhook-secret")
def keys_webhook_secret(
    key: Annotated[int, typer.Argument(help="The key's id (see keys list).")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Print the secret that signs this key's webhooks (give it to the receiver)."""
    store = _key_store(data_dir, database_url)
    if store.get(key) is None:
        typer.echo(f"no key with id {key}", err=True)
        raise typer.Exit(1)
    typer.echo(store.webhook_secret(key))


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id, its prefix as listed (fs_ab12cd3…) or the whole key.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke a key: it stops working at once."""
    row = _key_store(data_dir, database_url).revoke(key)
    if row is None:
        typer.echo(f"no key matches {key!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked key {row.id} ({row.name})")


@models_app.command("list")
def models_list(
    models: Annotated[str | None, typer.Option(help="real | tiny [env FLUXSERVE_MODELS].")] = None,
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array (for scripts).")] = False,
) -> None:
    """The registry in effect: each model's family and pipeline, weights source, whether the Hugging
    Face cache holds them (read locally, never over the network) and their size, licence and gating."""
    from fluxserve.runtime import build_registry
    from fluxserve.weights import registry_status

    settings = _settings(models=models, data_dir=data_dir)
    rows = registry_status(build_registry(settings, build_tiny=False).specs())
    if as_json:
        typer.echo(json.dumps([row.as_json() for row in rows], indent=2))
        return
    from fluxserve.cli_display import models_table, stdout_console

    stdout_console().print(models_table(rows))


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="A model name or alias (see models list).")],
    models: Annotated[str | None, typer.Option(help="real | tiny [env FLUXSERVE_MODELS].")] = None,
    data_dir: DataDir = None,
) -> None:
    """Download a model's weights into the Hugging Face cache (HF_HOME), after checking the disk
    has room for them. Gated repos need HF_TOKEN of an account that accepted the licence."""
    from fluxserve.models import UnknownModel
    from fluxserve.runtime import build_registry
    from fluxserve.weights import CacheView, PullError, download, human_bytes, is_hub_id, plan_pull

    settings = _settings(models=models, data_dir=data_dir)
    registry = build_registry(settings, build_tiny=False)
    try:
        spec = registry.get(name)
    except UnknownModel:
        typer.echo(f"unknown model {name!r}; known: {', '.join(registry.names())}", err=True)
        raise typer.Exit(1) from None
    if settings.models == "tiny":
        typer.echo(f"{spec.name}: nothing to pull: the tiny models are random weights built here "
                   "(`fluxserve models build-tiny`, or at the first `serve --models tiny`)")
        return
    if not is_hub_id(spec.source):
        typer.echo(f"{spec.name}: nothing to pull: it loads local weights from {spec.source}")
        return
    cache = CacheView()
    try:
        plan = plan_pull(spec.source, cache)
        needed = "unknown (HF_HUB_OFFLINE is set)" if plan.needed_bytes is None else f"about {human_bytes(plan.needed_bytes)}"
        typer.echo(f"{spec.name}: pulling {spec.source} into {plan.cache_dir} (to download: {needed}; "
                   f"free: {human_bytes(plan.free_bytes)})", err=True)
        path = download(plan)
    except PullError as exc:
        typer.echo(f"{spec.name}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{spec.name}: {spec.source} is cached at {path} ({human_bytes(CacheView().size(spec.source))})")


@models_app.command("build-tiny")
def models_build_tiny(data_dir: DataDir = None) -> None:
    """Build the tiny random-weight pipelines and their demo LoRA adapters (offline, deterministic, once)."""
    from fluxserve.engine.tiny import build_tiny_loras, build_tiny_models

    settings = _settings(data_dir=data_dir)
    for name, path in build_tiny_models(settings.tiny_models_dir).items():
        typer.echo(f"{name}\t{path}")
    for name, path in build_tiny_loras(settings.tiny_models_dir, settings.tiny_loras_dir).items():
        typer.echo(f"LoRA {name}\t{path}")


if __name__ == "__main__":  # pragma: no cover
    app()
