"""The Dockerfile and .dockerignore, read offline (no Docker engine runs here, so the image is not
built: deploy/README.md says what that leaves unverified), and the image's health check run for
real against loopback servers."""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import re
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from importlib.metadata import requires

import pytest
from packaging.requirements import Requirement

from tests.deploy.manifests import DEPLOY, ROOT

DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def args_of(word: str) -> list[str]:
    return [rest for name, rest in instructions() if name == word]


def arg_default(name: str) -> str:
    (value,) = [rest.split("=", 1)[1] for rest in args_of("ARG") if rest.startswith(name + "=")]
    return value


def test_base_is_a_cuda_runtime_matching_the_torch_build():
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-cudnn-runtime-ubuntu24\.04", arg_default("CUDA_IMAGE"))
    stages = args_of("FROM")
    assert stages == ["${CUDA_IMAGE} AS build", "${CUDA_IMAGE}"], "two stages on the one base"


def test_torch_is_pinned_to_what_the_project_allows():
    version = arg_default("TORCH_VERSION")
    makefile_pin = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), flags=re.M)
    assert makefile_pin and makefile_pin.group(1) == version, "the same torch as the Makefile's"
    (torch,) = [Requirement(item) for item in requires("fluxserve") or [] if Requirement(item).name == "torch"]
    assert torch.specifier.contains(version)
    runs = " ".join(args_of("RUN"))
    assert 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert runs.index("torch==${TORCH_VERSION}") < runs.index('pip install ".[postgres]"'), "torch first, then the project"


def test_runs_as_a_non_root_user_with_fluxserve_as_entrypoint():
    (user,) = args_of("USER")
    assert user.split(":")[0] not in ("0", "root")
    (entrypoint,) = args_of("ENTRYPOINT")
    assert entrypoint.endswith('"fluxserve"]')
    assert args_of("CMD") == ['["serve"]']
    assert "FLUXSERVE_HOST=0.0.0.0" in " ".join(args_of("ENV")), "reachable from outside the container"


def test_weights_live_on_a_volume_and_none_are_baked_in():
    env = " ".join(args_of("ENV"))
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    (volumes,) = args_of("VOLUME")
    assert any(hf_home.startswith(volume.strip('[]" ,')) for volume in volumes.split(","))
    runs = " ".join(args_of("RUN")).lower()
    for downloader in ("huggingface-cli", "hf download", "snapshot_download", "from_pretrained", "build-tiny"):
        assert downloader not in runs


def test_the_health_check_is_the_file_copied_in():
    (healthcheck,) = args_of("HEALTHCHECK")
    assert healthcheck.endswith('CMD ["python3", "/opt/fluxserve/healthcheck.py"]')
    copies = args_of("COPY")
    assert "deploy/docker/healthcheck.py /opt/fluxserve/healthcheck.py" in copies
    assert HEALTHCHECK.is_file()


# -- the build context -----------------------------------------------------------------------------


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for the patterns used here: the last matching line wins, `!`
    keeps, a pattern matches a path or any folder above it, `**` spans folders."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*/", "(.*/)?")
        if pattern.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pattern[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            result = not keep
    return result


@pytest.mark.parametrize(("path", "sent"), [
    ("pyproject.toml", True), ("README.md", True), ("src/fluxserve/cli.py", True), ("deploy/docker/healthcheck.py", True),
    (".venv/bin/python", False), (".git/HEAD", False), ("tests/conftest.py", False), ("data/fluxserve.db", False),
    ("bench/stages.py", False), ("deploy/.env", False), ("deploy/compose.yaml", False),
    ("deploy/kubernetes/overlays/example/secrets.env", False), ("src/fluxserve/__pycache__/cli.cpython-312.pyc", False),
])
def test_the_build_context_holds_what_the_build_reads_and_no_secrets(path, sent):
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert ignored(path, patterns) is not sent


# -- the health check, run --------------------------------------------------------------------------


def load_healthcheck():
    spec = importlib.util.spec_from_file_location("fluxserve_image_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def health_server(status: int):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("api", "worker", "healthy"), [
    (200, None, True),    # serve / serve --no-worker: the API answers
    (503, 200, False),    # the API answers degraded: unhealthy, whatever else listens
    (None, 200, True),    # worker: nothing on the API port, the worker's port answers
    (None, 503, False),
    (None, None, False),  # nothing answers
])
def test_the_health_check_asks_whichever_role_runs(api, worker, healthy):
    check = load_healthcheck()
    with health_server(api or 200) as api_port, health_server(worker or 200) as worker_port:
        env = {"FLUXSERVE_PORT": str(api_port if api else closed_port()),
               "FLUXSERVE_WORKER_PORT": str(worker_port if worker else closed_port())}
        assert (check.main(env) == 0) is healthy


def test_the_health_check_needs_only_the_standard_library():
    source = HEALTHCHECK.read_text()
    imported = set(re.findall(r"^(?:from|import) (\w+)", source, flags=re.M))
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
    result = subprocess.run([sys.executable, "-I", str(HEALTHCHECK)], capture_output=True, text=True, timeout=30,
                            env={"FLUXSERVE_PORT": str(closed_port()), "FLUXSERVE_WORKER_PORT": str(closed_port())})
    assert result.returncode == 1 and "nothing answers" in result.stdout


def test_the_readme_names_the_base_and_torch_built():
    readme = (DEPLOY / "README.md").read_text()
    assert f"Base `{arg_default('CUDA_IMAGE')}`" in readme
    assert f"`torch=={arg_default('TORCH_VERSION')}`" in readme
