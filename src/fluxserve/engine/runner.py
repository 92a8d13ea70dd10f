"""The engine as the worker sees it: load a model, generate a job's images (alone or batched
with compatible jobs), report what is loaded, give memory back. The worker holds an ``Engine``
and never imports torch itself (its unit tests use a fake with the same methods)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from fluxserve.engine.families.base import Inputs
from fluxserve.engine.generate import Generator, Progress
from fluxserve.engine.loading import PipelineCache
from fluxserve.models import ModelSpec
from fluxserve.params import JobParams


class Engine:
    def __init__(self, pipelines: PipelineCache):
        self.pipelines = pipelines
        self.generator = Generator(pipelines)

    @property
    def device(self) -> str:
        return self.pipelines.device

    def load(self, spec: ModelSpec) -> None:
        """Load (and place) ``spec``'s pipeline now, so that generation time is generation."""
        self.pipelines.get(spec)

    def pipeline(self, spec: ModelSpec) -> Any:
        """The loaded pipeline itself (the prompt enhancer reuses its text encoder)."""
        return self.pipelines.get(spec)

    def generate(self, spec: ModelSpec, params: JobParams, inputs: Inputs, progress: Progress | None = None) -> list[Image.Image]:
        return self.generator.run(spec, params, inputs, progress=progress)

    def generate_batch(self, spec: ModelSpec, jobs: list[JobParams], progress: Progress | None = None) -> list[list[Image.Image]]:
        return self.generator.run_batch(spec, jobs, progress=progress)

    def loaded(self) -> list[str]:
        return self.pipelines.loaded()

    def clear(self) -> None:
        self.pipelines.clear()

    def release_memory(self) -> None:
        self.pipelines.release_memory()

    @staticmethod
    def is_out_of_memory(exc: BaseException) -> bool:
        return isinstance(exc, torch.cuda.OutOfMemoryError)

    def status(self) -> dict[str, Any]:
        """Loaded models, accelerator memory, residency and optimizations (for system_details)."""
        return {"models_loaded": self.loaded(), "gpu_memory": gpu_memory(), "device": self.device,
                "residency": self.pipelines.residency.accounting(),
                "optimizations": self.pipelines.optimization_reports()}


def gpu_memory() -> dict[str, int] | None:
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"allocated_bytes": torch.cuda.memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved(),
            "free_bytes": free, "total_bytes": total}
