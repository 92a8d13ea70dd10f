"""Getting a claimed job ready to generate: its parameters and meta, the prompt rewrite it
asked for (``enhance_prompt``), and its stored input images (references, second image, mask)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from fluxserve.engine.families.base import Inputs
from fluxserve.jobs.tables import Job
from fluxserve.models import ModelSpec, Registry
from fluxserve.params import JobParams
from fluxserve.storage.local import LocalStorage
from fluxserve.storage.shared import SharedImages


class PromptEngine(Protocol):
    def pipeline(self, spec: ModelSpec) -> Any: ...


@dataclass
class PreparedJob:
    job: Job
    params: JobParams
    spec: ModelSpec
    meta: dict[str, Any]  # what the client will see (the job's meta, plus what happened here)
    inputs: Inputs


class Preparer:
    """``shared``: the server-wide bucket's copies (``storage.shared``), where an input stored by
    an API replica on another node is found (and then kept in the local inputs folder)."""

    def __init__(self, registry: Registry, inputs: LocalStorage, engine: PromptEngine, enhancer: Any = None,
                 shared: SharedImages | None = None):
        self.registry = registry
        self.inputs = inputs
        self.engine = engine
        self.enhancer = enhancer
        self.shared = shared

    def prepare(self, job: Job) -> PreparedJob:
        params = JobParams.from_dict(job.params)
        meta = dict(job.meta)
        if params.enhance_prompt:
            params.prompt = self._enhance(params.prompt, meta)
        return PreparedJob(job, params, self.registry.get(params.model), meta, self._inputs(params))

    def _inputs(self, params: JobParams) -> Inputs:
        references = [self._load(name) for name in params.inputs]
        mask = None
        if params.mask:
            mask = self._load(params.mask, "L")
            if references and mask.size != references[0].size:  # any size: resized to the image
                mask = mask.resize(references[0].size, Image.Resampling.BILINEAR)
        return Inputs(references=references, second=self._load(params.input_2) if params.input_2 else None, mask=mask)

    def _load(self, name: str, mode: str = "RGB") -> Image.Image:
        path = self.inputs.path_for(name)
        assert path is not None, f"unsafe input name {name!r}"  # job params hold only names the API stored
        if not path.is_file() and self.shared is not None:
            # stored by an API on another node: its bucket copy (a store that is away raises a
            # transient UploadError: the job waits for it; a missing object fails the job)
            self.inputs.save(name, self.shared.inputs.read(name))
        with Image.open(path) as image:
            return image.convert(mode)

    def _enhance(self, prompt: str, meta: dict[str, Any]) -> str:
        """Rewrite the prompt (default: with the text encoder of a model that can write prompts);
        on any failure the original is used. Both prompts, and how it went, go into meta."""
        writer = self.registry.prompt_writer()
        getter = (lambda: self.engine.pipeline(writer)) if writer is not None else None
        result = self.enhancer.enhance(prompt, getter) if self.enhancer else None
        meta["original_prompt"] = prompt
        if result is None or not result.ok:
            meta["enhance_prompt_status"] = f"failed, original prompt used: {result.error if result else 'no enhancer'}"
            return prompt
        meta.update(prompt=result.prompt, enhanced_prompt=result.prompt, enhance_prompt_status="ok",
                    enhance_prompt_source=result.source, enhance_prompt_seconds=round(result.seconds, 3))
        return result.prompt
