"""The ``fluxserve`` command: serve, keys, models."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

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
models_app = typer.Typer(help="Inspect the model registry and build the tiny offline models.", no_args_is_help=True)
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


def _settings(env_file: Path | None = None, **overrides) -> Settings:
    """:func:`_load_settings` for a command: a refused setting ends it before it does anything,
    with one line per problem naming the variable (and the flag, ``overrides`` being the
    command's flags) on stderr, and status 2."""
    try:
        return _load_settings(env_file, **overrides)
    except ValidationError as exc:
        for line in settings_problems(exc, flags=overrides):
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
    env_file: Annotated[
        Path | None, typer.Option(help="Settings file re-read by update_server [env FLUXSERVE_ENV_FILE].")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Run the API server with its GPU worker (embedded default: SQLite + local disk). SIGTERM
    or Ctrl+C stops it gracefully (no new jobs; the running one gets FLUXSERVE_SHUTDOWN_GRACE_SECONDS
    to finish, else goes back to the queue); a second one stops it at once."""
    flags = dict(host=host, port=port, models=models, data_dir=data_dir, database_url=database_url,
                 public_base_url=public_base_url, worker=worker)
    settings = _settings(env_file, **flags)  # first: a refused setting starts nothing

    from fluxserve.runtime import build_server_app
    from fluxserve.serving import run_server

    configure_logging(log_level, settings.log_format)
    # update_server reports a refused setting itself (400, nothing changed)
    app_ = build_server_app(settings, reload_settings=lambda: _load_settings(env_file, **flags))
    if not _key_store(settings.data_dir, settings.database_url).list():
        logging.getLogger("fluxserve").warning("no API keys yet: create one with `fluxserve keys create NAME`")
    run_server(app_, settings, log_level)  # SIGTERM/SIGINT: a graceful stop (see fluxserve.serving)


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
    models: Annotated[str | None, typer.Option(help="real | tiny")] = None, data_dir: DataDir = None
) -> None:
    """Show each model name with its pipeline, weights source and defaults."""
    from fluxserve.runtime import build_registry

    settings = _settings(models=models, data_dir=data_dir)
    for spec in build_registry(settings, build_tiny=False).specs():
        defaults = f"steps={spec.steps} guidance={spec.guidance} strength={spec.strength}"
        typer.echo(f"{spec.name}\t{spec.pipeline}\t{spec.source}\t{defaults}")


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
