"""The model registry: each served model name -> its family (``engine/families``), weights and
defaults. A new model of a known family is one entry here; a new family is its file plus one
entry.

Pure data (no torch import): the HTTP layer resolves ``model_id`` and checks a request against
the family's limits here; the engine turns a :class:`ModelSpec` into a loaded pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fluxserve.engine.families import fill, flux1, klein, kontext
from fluxserve.engine.families.base import Family, Task


@dataclass(frozen=True)
class ModelSpec:
    name: str  # reported as meta.model_id
    family: Family
    source: str  # hub id or local folder
    steps: int
    guidance: float
    strength: float  # default strength for image-to-image and inpainting
    true_cfg_scale: float = 1.0  # > 1 applies negative_prompt where the family can (costs 2x)
    aliases: tuple[str, ...] = ()  # other model ids clients send for this model (ModelsLab's names)
    max_init_images: int | None = None  # fewer than the family allows (None: the family's limit)

    @property
    def pipeline(self) -> str:
        """The diffusers class loaded from ``source``."""
        return self.family.pipeline

    @property
    def pipeline_key(self) -> str:
        """How the engine names a loaded pipeline (``Engine.loaded()``): models with the same
        class and weights share one (e.g. realtime and flux-klein)."""
        return f"{self.pipeline}:{self.source}"

    @property
    def negative_prompt_supported(self) -> bool:
        return self.family.limits.negative_prompt

    @property
    def init_image_limit(self) -> int:
        return self.max_init_images or self.family.limits.max_init_images

    def supports(self, task: Task | str) -> bool:
        return Task(task) in self.family.tasks

    @property
    def hub_weights(self) -> HubWeights | None:
        """What is known of ``source`` when it is one of the hub repos below (None: a local folder
        or another repo)."""
        return HUB_WEIGHTS.get(self.source)


@dataclass(frozen=True)
class HubWeights:
    """Facts about a hub repo the registry uses, kept here rather than fetched (``fluxserve models
    list`` and ``doctor`` work offline). Sizes are approximate: the diffusers-format components
    (``model_index.json`` and the component folders, what ``models pull`` downloads) in bf16,
    which is also roughly the accelerator memory the loaded pipeline holds."""

    licence: str
    gated: bool  # the hub serves the files only to accounts that accepted the licence (HF_TOKEN)
    download_gib: float  # the diffusers components on disk
    memory_gib: float  # weights in memory (bf16) plus headroom for a 1024x1024 generation


_FLUX1_LICENCE = "FLUX.1 [dev] Non-Commercial License"
HUB_WEIGHTS: dict[str, HubWeights] = {
    # transformer 3.88 B params (7.75 GB) + Qwen3-4B text encoder (8.04 GB) + VAE (docs/design MODELS.md)
    "black-forest-labs/FLUX.2-klein-4B": HubWeights("Apache-2.0", gated=False, download_gib=15.0, memory_gib=17.0),
    # transformer 11.9 B params (23.8 GB) + T5-XXL (9.5 GB) + CLIP-L + VAE
    "black-forest-labs/FLUX.1-dev": HubWeights(_FLUX1_LICENCE, gated=True, download_gib=31.5, memory_gib=34.0),
    "black-forest-labs/FLUX.1-Fill-dev": HubWeights(_FLUX1_LICENCE, gated=True, download_gib=31.5, memory_gib=34.0),
    "black-forest-labs/FLUX.1-Kontext-dev": HubWeights(_FLUX1_LICENCE, gated=True, download_gib=31.5, memory_gib=34.0),
}


_KLEIN_4B = "black-forest-labs/FLUX.2-klein-4B"
DEFAULT_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("flux-klein", klein.FAMILY, _KLEIN_4B, steps=4, guidance=1.0, strength=1.0,
                  aliases=("flux-2-klein", "flux-2-klein-4b", "flux2-klein", "flux-klein-4b")),
        # The realtime server is the same fast model; img2img there takes one init image (its docs)
        # and keeps more of it.
        ModelSpec("realtime", klein.FAMILY, _KLEIN_4B, steps=4, guidance=1.0, strength=0.7, max_init_images=1),
        ModelSpec("flux", flux1.FAMILY, "black-forest-labs/FLUX.1-dev", steps=10, guidance=3.5, strength=0.7,
                  aliases=("flux-dev", "flux-1-dev", "flux.1-dev")),
        ModelSpec("flux-fill", fill.FAMILY, "black-forest-labs/FLUX.1-Fill-dev", steps=28, guidance=30.0, strength=1.0,
                  aliases=("flux-fill-dev", "flux-1-fill-dev")),
        ModelSpec("flux-kontext-dev", kontext.FAMILY, "black-forest-labs/FLUX.1-Kontext-dev", steps=28, guidance=2.5,
                  strength=0.5, aliases=("flux-kontext",)),
    )
}

#: Overridable fields -> the JSON type each must have.
_OVERRIDABLE: dict[str, tuple[type, ...]] = {
    "source": (str,), "steps": (int,), "guidance": (int, float), "strength": (int, float),
    "true_cfg_scale": (int, float),
}
_KIND_WORDS: dict[tuple[type, ...], str] = {(str,): "a string", (int,): "a whole number"}  # else "a number"


class UnknownModel(KeyError):
    pass


class UnsuitableRequest(ValueError):
    """A request the chosen model can't serve; ``status`` is the HTTP status to answer with and
    the message is for the client."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


TASK_WORDS = {Task.TEXT2IMG: "text-to-image", Task.IMG2IMG: "image-to-image", Task.INPAINT: "inpainting"}


class Registry:
    def __init__(self, specs: dict[str, ModelSpec]):
        self._specs = dict(specs)
        self._ids = {alias.lower(): spec.name for spec in self._specs.values() for alias in (spec.name, *spec.aliases)}

    @classmethod
    def build(
        cls, overrides: dict[str, dict[str, Any]] | None = None, tiny_root: Path | None = None
    ) -> Registry:
        """Default registry, with per-model overrides applied; with ``tiny_root`` every
        source points at its family's offline tiny build instead of the hub."""
        specs = dict(DEFAULT_REGISTRY)
        if tiny_root is not None:  # before overrides: an explicit source still wins in tiny mode
            specs = {n: replace(s, source=str(tiny_root / s.family.name)) for n, s in specs.items()}
        for name, fields in (overrides or {}).items():
            if not isinstance(fields, dict):
                raise ValueError(f"model_overrides[{name!r}] must be an object of fields")
            unknown = set(fields) - set(_OVERRIDABLE)
            if unknown:
                raise ValueError(f"model_overrides[{name!r}]: unknown fields {sorted(unknown)}; "
                                 f"overridable: {', '.join(sorted(_OVERRIDABLE))}")
            for field, value in fields.items():
                if isinstance(value, bool) or not isinstance(value, _OVERRIDABLE[field]):
                    kind = _KIND_WORDS.get(_OVERRIDABLE[field], "a number")
                    raise ValueError(f"model_overrides[{name!r}].{field} must be {kind}, not {value!r}")
            base = specs.get(name)
            if base is None:
                raise ValueError(f"model_overrides names unknown model {name!r}; known: {', '.join(sorted(specs))}")
            specs[name] = replace(base, **fields)
        return cls(specs)

    def get(self, name: str) -> ModelSpec:
        """The model called ``name`` or one of its aliases (any case)."""
        try:
            return self._specs[self._ids[name.strip().lower()]]
        except KeyError:
            raise UnknownModel(name) from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[ModelSpec]:
        return [self._specs[n] for n in self.names()]

    def for_task(self, task: Task | str) -> list[str]:
        """Names of the models that can do ``task``."""
        return [spec.name for spec in self.specs() if spec.supports(task)]

    def resolve(self, model_id: str, task: Task | str) -> ModelSpec:
        """The model a client's ``model_id`` names, if it can do ``task``; otherwise 404
        ``Model not found: <model_id>`` (saying which models can, when the model exists)."""
        task = Task(task)
        try:
            spec = self.get(model_id)
        except UnknownModel:
            raise UnsuitableRequest(f"Model not found: {model_id}", 404) from None
        if not spec.supports(task):
            raise UnsuitableRequest(
                f"Model not found: {model_id} ({TASK_WORDS[task]} models here: {', '.join(self.for_task(task))})", 404)
        return spec

    def check_inputs(self, spec: ModelSpec, task: Task | str, *, init_images: int, second_image: bool,
                     mask: bool, loras: bool = False) -> None:
        """Refuse (400) inputs the model's family can't take, before anything is queued."""
        task, limits = Task(task), spec.family.limits
        if not spec.supports(task):
            raise UnsuitableRequest(f"Model not found: {spec.name} ({TASK_WORDS[task]} models here: "
                                    f"{', '.join(self.for_task(task))})", 404)
        if task is not Task.TEXT2IMG and init_images < 1:
            raise UnsuitableRequest("init_image is required")
        if init_images > spec.init_image_limit:
            raise UnsuitableRequest(f"init_image accepts at most {spec.init_image_limit} image URL(s) for {spec.name}")
        if second_image and not limits.second_image:
            takers = [s.name for s in self.specs() if s.family.limits.second_image]
            raise UnsuitableRequest(f"init_image_2 is only supported by {', '.join(takers) or 'no model served here'}")
        if task is Task.INPAINT and not mask:
            raise UnsuitableRequest("mask_image is required")
        if loras and not spec.family.takes_loras:
            takers = [s.name for s in self.specs() if s.family.takes_loras]
            raise UnsuitableRequest(f"{spec.name} does not take LoRA adapters (lora_model); models that do: "
                                    f"{', '.join(takers) or 'none served here'}")

    def prompt_writer(self) -> ModelSpec | None:
        """A model whose text encoder can rewrite prompts (``enhance_prompt``), if one is served."""
        return next((spec for spec in self.specs() if spec.family.writes_prompts), None)
