"""The ``fluxserve worker`` role without starting workers: settings refused at start naming the
variable (and flag), no torch in its process in process mode, its small app's answers when its
workers are not alive; and how a thread worker is given its GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from fluxserve.cli import app
from fluxserve.config import Settings
from fluxserve.supervisor import _process_settings, _thread_settings


@pytest.fixture(autouse=True)
def _no_fluxserve_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("FLUXSERVE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("args", "line"), [
    (["--worker-models", "flux,flux-pro"], "FLUXSERVE_WORKER_MODELS (--worker-models): unknown model 'flux-pro'; known: "),
    (["--gpus", "0;1"], "FLUXSERVE_GPUS (--gpus): not a GPU list: '0;1'"),
    (["--port", "0"], "FLUXSERVE_WORKER_PORT: Input should be greater than or equal to 1"),
])
def test_a_refused_setting_stops_the_worker_role_before_anything_runs(tmp_path, args, line):
    result = CliRunner().invoke(app, ["worker", *args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(line), result.stderr
    assert not (tmp_path / "fluxserve.db").exists()  # nothing opened


def test_serve_refuses_an_unknown_worker_model_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXSERVE_WORKER_MODELS", "klein")
    result = CliRunner().invoke(app, ["serve", "--no-worker", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("FLUXSERVE_WORKER_MODELS: unknown model 'klein'"), result.stderr


def test_the_worker_role_process_imports_no_torch_in_process_mode(tmp_path):
    """Its workers are child processes: the role's own process (pool, health, metrics) stays torch-free."""
    code = (
        "import sys\n"
        "from fluxserve.config import Settings\n"
        "from fluxserve.worker_service import build_worker_app\n"
        f"app = build_worker_app(Settings(data_dir={str(tmp_path)!r}, models='real', worker='process'), gpus=['0', '1'])\n"
        "print(sorted(route.path for route in app.routes))\n"
        "print(len(app.state.pool.hosts), [host.gpu for host in app.state.pool.hosts])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'}))\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLUXSERVE_")}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    assert out.splitlines() == ["['/health', '/metrics']", "2 ['0', '1']", "[]"]


def test_the_worker_port_answers_503_while_its_workers_are_not_running(tmp_path):
    from fluxserve.worker_service import build_worker_app

    built = build_worker_app(Settings(data_dir=tmp_path, models="real", worker="process"), gpus=[None])
    client = TestClient(built)  # no lifespan: the workers were never started
    health = client.get("/health")
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "degraded" and body["role"] == "worker" and body["worker"]["alive"] is False
    assert body["busy"] == 0 and body["stopping"] is False
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "fluxserve_workers_alive 0.0" in metrics.text and "fluxserve_queue_depth 0.0" in metrics.text
    assert client.get("/api/v1/enterprise/flux_klein/text2img").status_code == 404  # no public API here


@pytest.mark.parametrize(("device", "gpu", "expected"), [
    ("auto", "1", "cuda:1"), ("cuda", "0", "cuda:0"), ("cpu", "1", "cpu"), ("cuda:3", "1", "cuda:3"),
    ("auto", None, "auto"), ("auto", "GPU-5e4b1c2d", "auto"),
])
def test_a_thread_worker_is_given_its_gpu_as_its_device(device, gpu, expected):
    assert _thread_settings(Settings(device=device), gpu).device == expected


@pytest.mark.parametrize(("device", "gpu", "expected"), [
    ("cuda:3", "1", "cuda:0"), ("cuda", "1", "cuda"), ("auto", "1", "auto"), ("cpu", "1", "cpu"), ("cuda:3", None, "cuda:3"),
])
def test_a_worker_process_given_one_gpu_sees_it_as_cuda_0(device, gpu, expected):
    assert _process_settings(Settings(device=device), gpu).device == expected
