"""The GPU tests (``pytest -m gpu``; issue 15): the service and its engine on a CUDA device with
the tiny pipelines. Without CUDA they are skipped, so CI on CPU is unaffected; the GPU run
(``bench/gpu/run.sh``) runs them on the device.

``FLUXSERVE_GPU_TESTS_ON_CPU=1`` runs the ones that make sense on a CPU with device ``cpu`` (fp32
instead of bf16, a simulated out-of-memory error instead of a real one, no memory readings): the
CPU rehearsal of the GPU run uses it to prove the tests themselves before device time is spent.

Each test may write what it measured to ``$FLUXSERVE_GPU_REPORT_DIR/<name>.json`` (``gpu_report``)
before it asserts, so the GPU run reports numbers even for a failing test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

NO_GPU = ("needs a CUDA GPU (none here): bench/gpu/run.sh runs these on the device; "
          "FLUXSERVE_GPU_TESTS_ON_CPU=1 rehearses them on the CPU")


def _device() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("FLUXSERVE_GPU_TESTS_ON_CPU") == "1":
        return "cpu"
    return None


@pytest.fixture
def device() -> str:
    """``cuda``; ``cpu`` in the CPU rehearsal; otherwise the test is skipped."""
    found = _device()
    if found is None:
        pytest.skip(NO_GPU)
    return found


@pytest.fixture
def cuda_device() -> str:
    """``cuda`` only: for what has no CPU equivalent at all (CPU offload needs an accelerator)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: CPU offload has no meaning on the CPU (bench/gpu/run.sh runs it on the device)")
    return "cuda"


class Report:
    """What a test measured, written as JSON to $FLUXSERVE_GPU_REPORT_DIR (if set) when saved."""

    def __init__(self, name: str, device: str | None):
        self.name = name
        self.data: dict = {"test": name, "device": device}
        if device == "cuda":
            self.data["gpu"] = torch.cuda.get_device_name()
        self.data["torch"] = torch.__version__

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        folder = os.environ.get("FLUXSERVE_GPU_REPORT_DIR")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"{self.name}.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")


@pytest.fixture
def gpu_report(request) -> Report:
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    return Report(name, _device())
