"""deploy/compose.yaml, checked offline: its structure (services, images, commands, GPU
reservations, health checks, start order, grace), the compose-spec JSON schema (as vendored by
check-jsonschema), its variables against fluxserve.env.example and fluxserve's own settings checks,
and `docker compose config` where a Compose v2 client is installed (it needs no engine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from fluxserve.config import Settings
from tests.deploy.manifests import (
    COMPOSE_ENV_EXAMPLE,
    COMPOSE_FILE,
    DEPLOY,
    OTHER_VARIABLES,
    ROOT,
    compose_raw,
    compose_resolved,
    container_environment,
    env_file,
    known_settings,
)

FLUXSERVE_SERVICES = ("api", "worker")
FINISH_MARGIN_SECONDS = 30  # as for Kubernetes: the worker stores its last result after the grace


def seconds(value: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value)
    assert match and value, f"not a compose duration this test reads: {value!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


@pytest.fixture(scope="module")
def compose():
    return compose_resolved()


def test_services_roles_and_images(compose):
    file, *_ = compose
    services = file["services"]
    assert sorted(services) == ["api", "minio", "minio-init", "postgres", "worker"]
    for name in ("postgres", "minio", "minio-init"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image})"
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["minio"]["image"].split(":")[0].endswith("minio/minio")
    assert services["minio-init"]["image"].split(":")[0].endswith("minio/mc")
    assert services["api"]["command"] == ["serve", "--no-worker"]
    assert services["worker"]["command"] == ["worker", "--gpus", "all"]
    for name in FLUXSERVE_SERVICES:
        assert services[name]["image"] == services["api"]["image"], "one image for both roles"
        assert services[name]["build"] == {"context": "..", "dockerfile": "Dockerfile"}
        assert (DEPLOY / services[name]["build"]["context"] / "Dockerfile").is_file()


def test_gpus_are_reserved_for_the_worker_only(compose):
    file, *_ = compose
    (device,) = file["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert "deploy" not in file["services"]["api"]


def test_every_service_has_a_health_check_and_starts_after_what_it_needs(compose):
    file, *_ = compose
    services = file["services"]
    for name in ("postgres", "minio", "api", "worker"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    for name in FLUXSERVE_SERVICES:
        assert services[name]["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "minio-init": {"condition": "service_completed_successfully"},
        }, name
        assert services[name]["healthcheck"]["test"] == ["CMD", "python3", "/opt/fluxserve/healthcheck.py"]
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["minio-init"]["restart"] == "no"


def test_the_bucket_made_is_the_one_fluxserve_uses(compose):
    file, variables, _ = compose
    script = file["services"]["minio-init"]["command"][0]
    s3 = json.loads(container_environment(file["services"]["api"], variables)["FLUXSERVE_S3_DEFAULT"])
    bucket, _, prefix = s3["image_directory"].partition("/")
    assert f"mc mb --ignore-existing local/{bucket} " in script
    assert f"mc anonymous set download local/{bucket}/{prefix}" in script
    assert s3["public_url"].endswith(f"/{bucket}/{prefix}")
    assert s3["endpoint_url"] == "http://minio:9000"


def test_ports_agree(compose):
    file, variables, _ = compose
    api = file["services"]["api"]
    assert api["ports"] == ["8000:8000"]
    assert variables["FLUXSERVE_WORKER_PORT"] == "9100"
    assert variables["FLUXSERVE_PUBLIC_BASE_URL"].endswith(":8000")
    assert "ports" not in file["services"]["worker"], "the worker has no public API"


def test_grace_periods(compose):
    file, variables, _ = compose
    grace = float(variables["FLUXSERVE_SHUTDOWN_GRACE_SECONDS"])
    assert seconds(file["services"]["worker"]["stop_grace_period"]) >= grace + FINISH_MARGIN_SECONDS
    assert seconds(file["services"]["api"]["stop_grace_period"]) > 30  # FLUXSERVE_SYNC_WAIT_SECONDS' default


def test_volumes_keep_the_state(compose):
    file, *_ = compose
    services = file["services"]
    assert "postgres:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "minio:/data" in services["minio"]["volumes"]
    assert "models:/models" in services["worker"]["volumes"]
    assert sorted(file["volumes"]) == ["data", "minio", "models", "postgres"]


def test_every_variable_is_defined_and_used(compose):
    file, variables, used = compose
    raw = COMPOSE_FILE.read_text()
    defaulted = set(re.findall(r"\$\{(\w+):-", raw))
    assert used - defaulted <= set(variables), f"used but not in the env example: {sorted(used - defaulted - set(variables))}"
    passed_through = {name for name in variables if name.startswith("FLUXSERVE_")}
    unused = set(variables) - used - passed_through
    assert not unused, f"in the env example but used by nothing: {sorted(unused)}"


def test_every_variable_name_is_a_real_setting(compose):
    file, variables, _ = compose
    names = set(variables)
    for name in FLUXSERVE_SERVICES:
        names |= set(container_environment(file["services"][name], variables))
    commented = set(re.findall(r"^# ?([A-Z][A-Z0-9_]+)=", COMPOSE_ENV_EXAMPLE.read_text(), flags=re.M))
    unknown = sorted(name for name in names | commented if name not in known_settings() | OTHER_VARIABLES)
    assert not unknown, f"not fluxserve settings (typo?): {unknown}"


@pytest.mark.parametrize("service", FLUXSERVE_SERVICES)
def test_fluxserve_accepts_what_each_container_gets(compose, service, monkeypatch):
    file, variables, _ = compose
    for name in list(os.environ):
        if name.startswith("FLUXSERVE_"):
            monkeypatch.delenv(name)
    env = container_environment(file["services"][service], variables)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # fluxserve's own checks: JSON, S3 details, URLs
    assert settings.database_url == "postgresql://fluxserve:change-me-postgres@postgres:5432/fluxserve"
    details = settings.s3_default_details()
    assert details is not None and details.bucket == "fluxserve" and details.prefix == "images"
    assert settings.secret_key and settings.model_overrides == {}


def test_the_env_example_is_plain_key_value():
    values = env_file(COMPOSE_ENV_EXAMPLE)
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_ROOT_USER"):
        assert re.fullmatch(r"[A-Za-z0-9-]+", values[name]), f"{name} goes inside a URL and JSON: letters, digits, -"


def test_compose_file_validates_against_the_compose_spec_schema():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (test extras, Python >= 3.11) vendors the compose-spec schema")
    from importlib.resources import files

    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose_raw()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    broken = compose_raw()
    device = broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    device["capability"] = device.pop("capabilities")
    assert list(validator.iter_errors(broken)), "the schema must see a misspelt GPU reservation"


def compose_client() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` v2, if one answers `version` here."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        result = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        if result.returncode == 0 and re.search(r"v2\.\d+", result.stdout):
            return command
    return None


def test_docker_compose_config_accepts_it(tmp_path):
    """Compose's own parser and interpolation, client-side only (no engine needed)."""
    command = compose_client()
    if command is None:
        pytest.skip("no Docker Compose v2 client here (`docker compose version` fails): the checks above stand in")
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns(".env", "secrets.env"))
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    shutil.copy(COMPOSE_ENV_EXAMPLE, tmp_path / "deploy" / ".env")
    result = subprocess.run([*command, "config", "--format", "json"], cwd=tmp_path / "deploy", capture_output=True,
                            text=True, timeout=60, env={**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"})
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    mine, *_ = compose_resolved()
    for name in FLUXSERVE_SERVICES:
        assert config["services"][name]["environment"]["FLUXSERVE_S3_DEFAULT"] == mine["services"][name]["environment"]["FLUXSERVE_S3_DEFAULT"]
    assert yaml.safe_load(Path(tmp_path / "deploy" / "compose.yaml").read_text())["name"] == config["name"]
