"""The layering rules: HTTP code (and the settings) never imports torch; engine code never imports the web
framework."""

from __future__ import annotations

import subprocess
import sys


def _imports(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_api_does_not_import_torch():
    loaded = _imports("fluxserve.api.app")
    assert "fastapi" in loaded
    assert not loaded & {"torch", "diffusers", "transformers"}


def test_engine_does_not_import_the_web_framework():
    loaded = _imports("fluxserve.engine.generate, fluxserve.engine.loading, fluxserve.engine.tiny, fluxserve.worker")
    assert "torch" in loaded
    assert not loaded & {"fastapi", "starlette", "uvicorn"}


def test_settings_do_not_import_torch():
    """The HTTP process builds and checks the settings (optimization grammar, sizes) without torch."""
    loaded = _imports("fluxserve.config, fluxserve.engine.switches, fluxserve.units")
    assert not loaded & {"torch", "diffusers", "transformers"}


def test_the_command_line_and_its_client_do_not_import_torch():
    """`fluxserve generate` runs on any laptop: the CLI, its HTTP client, the cache view and the doctor
    (which imports torch only inside its checks) load without torch."""
    loaded = _imports("fluxserve.cli, fluxserve.cli_display, fluxserve.client.generate, fluxserve.weights, fluxserve.doctor")
    assert "httpx" in loaded and "rich" in loaded
    assert not loaded & {"torch", "diffusers", "transformers"}
