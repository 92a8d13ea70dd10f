"""The model registry: which diffusers pipeline, weights and defaults serve each model name.

Pure data (no torch import) so the HTTP layer can validate ``model_id`` and report defaults.
The engine turns a :class:`ModelSpec` into a loaded pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

KLEIN = "flux-klein"
REALTIME = "realtime"
FLUX1 = "flux"
KONTEXT = "flux-kontext-dev"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # reported as meta.model_id
    pipeline: str  # diffusers class name
    source: str  # hub id or local folder
    tiny_dir: str  # folder name of the offline tiny build (engine/tiny.py)
    steps: int
    guidance: float
    strength: float  # default strength for image-to-image requests
    true_cfg_scale: float = 1.0  # > 1 applies negative_prompt (FLUX.1 family only; costs 2x)
    negative_prompt_supported: bool = False

    @property
    def family(self) -> str:
        """Pipelines that share weights and code paths: "flux2" or "flux1"."""
        return "flux2" if self.pipeline.startswith("Flux2") else "flux1"


DEFAULT_REGISTRY: dict[str, ModelSpec] = {
    KLEIN: ModelSpec(
        KLEIN, "Flux2KleinPipeline", "black-forest-labs/FLUX.2-klein-4B", "flux2-klein",
        steps=4, guidance=1.0, strength=1.0,
    ),
    # The realtime server is the same fast model; img2img there keeps more of the init image.
    REALTIME: ModelSpec(
        REALTIME, "Flux2KleinPipeline", "black-forest-labs/FLUX.2-klein-4B", "flux2-klein",
        steps=4, guidance=1.0, strength=0.7,
    ),
    FLUX1: ModelSpec(
        FLUX1, "FluxImg2ImgPipeline", "black-forest-labs/FLUX.1-dev", "flux1-dev",
        steps=10, guidance=3.5, strength=0.7, negative_prompt_supported=True,
    ),
    KONTEXT: ModelSpec(
        KONTEXT, "FluxKontextPipeline", "black-forest-labs/FLUX.1-Kontext-dev", "flux-kontext",
        steps=28, guidance=2.5, strength=0.5, negative_prompt_supported=True,
    ),
}

#: Overridable fields -> the JSON type each must have.
_OVERRIDABLE: dict[str, tuple[type, ...]] = {
    "pipeline": (str,), "source": (str,), "steps": (int,), "guidance": (int, float), "strength": (int, float),
    "true_cfg_scale": (int, float),
}


class UnknownModel(KeyError):
    pass


class Registry:
    def __init__(self, specs: dict[str, ModelSpec]):
        self._specs = dict(specs)

    @classmethod
    def build(
        cls, overrides: dict[str, dict[str, Any]] | None = None, tiny_root: Path | None = None
    ) -> "Registry":
        """Default registry, with per-model overrides applied; with ``tiny_root`` every
        source points at the offline tiny build instead of the hub."""
        specs = dict(DEFAULT_REGISTRY)
        if tiny_root is not None:  # before overrides: an explicit source still wins in tiny mode
            specs = {n: replace(s, source=str(tiny_root / s.tiny_dir)) for n, s in specs.items()}
        for name, fields in (overrides or {}).items():
            if not isinstance(fields, dict):
                raise ValueError(f"model_overrides[{name!r}] must be an object of fields")
            unknown = set(fields) - set(_OVERRIDABLE)
            if unknown:
                raise ValueError(f"model_overrides[{name!r}]: unknown fields {sorted(unknown)}; "
                                 f"overridable: {', '.join(sorted(_OVERRIDABLE))}")
            for field, value in fields.items():
                if isinstance(value, bool) or not isinstance(value, _OVERRIDABLE[field]):
                    kind = {(str,): "a string", (int,): "a whole number"}.get(_OVERRIDABLE[field], "a number")
                    raise ValueError(f"model_overrides[{name!r}].{field} must be {kind}, not {value!r}")
            base = specs.get(name)
            if base is None:
                raise ValueError(f"model_overrides names unknown model {name!r}; known: {', '.join(sorted(specs))}")
            specs[name] = replace(base, **fields)
        return cls(specs)

    def get(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownModel(name) from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[ModelSpec]:
        return [self._specs[n] for n in self.names()]
