"""LoRA adapters a request may name (``lora_model``), and where each one's weights are: the
catalog. Pure data and file names (no torch): the HTTP layer refuses an unknown adapter before a
job is queued, and the engine (``engine.lora``) asks the same catalog where to load it from.

An adapter is either

* a file in the LoRA folder (``FLUXSERVE_LORA_DIR``, default ``<data_dir>/loras``):
  ``<name>.safetensors``, or a folder ``<name>/`` holding ``pytorch_lora_weights.safetensors``
  or exactly one ``*.safetensors`` (a LoRA as the hub ships it); ``name`` is letters, digits,
  ``.``, ``_`` and ``-`` (no path: nothing outside the folder can be named);
* a Hugging Face hub repository, ``org/repo`` or ``org/repo:file.safetensors``, only when it is
  listed in ``FLUXSERVE_LORA_HUB_IDS`` (``org/repo`` there allows every file of the repo). Its
  files come through huggingface_hub's own cache; never from a URL.

With ``--models tiny`` the tiny random-weight demo adapters (one per family that takes LoRAs,
``tiny-<family>``) are offered too, after the folder's own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_ADAPTERS = 4  # adapters one request may combine
STRENGTH_MIN, STRENGTH_MAX = 0.0, 2.0
DEFAULT_STRENGTH = 1.0
SUFFIX = ".safetensors"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes

_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
_HUB = re.compile(rf"(?P<repo>{_HUB_PART}/{_HUB_PART})(?::(?P<file>[A-Za-z0-9][A-Za-z0-9_.-]{{0,200}}\.safetensors))?")
_SHOWN = 20  # available names listed in an error message


class UnknownLora(ValueError):
    """A ``lora_model`` entry that names no adapter this server offers (message for the client)."""


@dataclass(frozen=True)
class LoraSource:
    """Where one adapter's weights are: a local file, or a hub repo (with a file name, or None
    for the repo's single ``.safetensors``)."""

    name: str  # as requested, which is also how meta and the engine's cache name it
    location: str  # a local file path, or the hub repo id
    weight_name: str | None = None
    hub: bool = False


def valid_name(name: str) -> bool:
    """Whether ``name`` has the form of an adapter name (local, or a hub id); says nothing of
    whether it exists."""
    return _local_name(name) or _HUB.fullmatch(name) is not None


def _local_name(name: str) -> bool:
    return _LOCAL.fullmatch(name) is not None and ".." not in name


def check_hub_id(entry: str) -> str:
    """An allowlist entry (``org/repo`` or ``org/repo:file.safetensors``), or ValueError."""
    if not _HUB.fullmatch(entry):
        raise ValueError(f"not a hub id: {entry!r} (expected org/repo or org/repo:file.safetensors; URLs are not allowed)")
    return entry


def describe(names: Sequence[str], strengths: Sequence[float]) -> str:
    """A stable text of an adapter set, e.g. ``style@0.8+detail@1`` (batch keys, logs)."""
    return "+".join(f"{name}@{strength:g}" for name, strength in zip(names, strengths))


class LoraCatalog:
    """The adapters this server offers: the files of ``folders`` (first wins) and the allowed hub
    ids. Folders are read when asked, so an adapter copied in is usable at once."""

    def __init__(self, folders: Iterable[Path], hub_ids: Iterable[str] = ()):
        self.folders = [Path(folder) for folder in folders]
        self.hub_ids = [check_hub_id(entry) for entry in hub_ids]

    @classmethod
    def from_settings(cls, settings: Any) -> LoraCatalog:
        folders = [settings.lora_folder]
        if settings.models == "tiny":
            folders.append(settings.tiny_loras_dir)
        return cls(folders, settings.lora_hub_ids)

    def resolve(self, name: str) -> LoraSource:
        """Where ``name``'s weights are; ``UnknownLora`` (for the client) when it is not offered."""
        if _local_name(name):
            for folder in self.folders:
                found = _weights_in(folder, name)
                if found is not None:
                    return LoraSource(name, str(found))
        else:
            hub = _HUB.fullmatch(name)
            if hub is not None and (name in self.hub_ids or hub["repo"] in self.hub_ids):
                return LoraSource(name, hub["repo"], hub["file"], hub=True)
            if hub is not None:
                raise UnknownLora(f"Unknown LoRA adapter: {name} (hub adapters must be allowed by this server; "
                                  f"available: {self._listing()})")
            raise UnknownLora(f"Unknown LoRA adapter: {name} (names are letters, digits, '.', '_' and '-', "
                              f"or an allowed hub id org/repo[:file.safetensors]; available: {self._listing()})")
        raise UnknownLora(f"Unknown LoRA adapter: {name} (available: {self._listing()})")

    def check(self, names: Iterable[str]) -> list[LoraSource]:
        return [self.resolve(name) for name in names]

    def available(self) -> list[str]:
        """Every adapter name offered: local ones (sorted), then the allowed hub ids."""
        local: set[str] = set()
        for folder in self.folders:
            try:
                entries = list(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                name = entry.name[: -len(SUFFIX)] if entry.name.endswith(SUFFIX) else entry.name
                if _local_name(name) and _weights_in(folder, name) is not None:
                    local.add(name)
        return sorted(local) + list(self.hub_ids)

    def _listing(self) -> str:
        names = self.available()
        if not names:
            return "none"
        shown = ", ".join(names[:_SHOWN])
        return shown + (f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def _weights_in(folder: Path, name: str) -> Path | None:
    """``folder/name.safetensors``, or the weights file of the folder ``folder/name``."""
    single = folder / f"{name}{SUFFIX}"
    if single.is_file():
        return single
    inside = folder / name
    if not inside.is_dir():
        return None
    preferred = inside / DIFFUSERS_WEIGHT_NAME
    if preferred.is_file():
        return preferred
    files = sorted(path for path in inside.glob(f"*{SUFFIX}") if path.is_file())
    return files[0] if len(files) == 1 else None


# -- request values -----------------------------------------------------------------------------
def parse_names(value: Any) -> list[str] | None:
    """``lora_model`` as clients send it: one name, comma-separated names, or an array of names."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    names: list[str] = []
    for item in items:
        if item is None:
            continue
        if not isinstance(item, str):
            raise ValueError("must be an adapter name, comma-separated names, or an array of names")
        names.extend(part.strip() for part in item.split(",") if part.strip())
    return names or None


def parse_strengths(value: Any, to_float) -> list[float] | None:
    """``lora_strength``: a number, comma-separated numbers, or an array of numbers (``to_float``
    is the lenient number parser)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    items = value if isinstance(value, list) else value.split(",") if isinstance(value, str) else [value]
    strengths = []
    for item in items:
        number = to_float(item)
        if number is None:
            raise ValueError("must be a number, comma-separated numbers, or an array of numbers")
        strengths.append(number)
    return strengths or None


def resolve_strengths(names: Sequence[str], strengths: Sequence[float] | None) -> list[float]:
    """One strength per adapter: the default, one for all, or one each (ValueError otherwise)."""
    if not strengths:
        return [DEFAULT_STRENGTH] * len(names)
    if len(strengths) == 1:
        return [strengths[0]] * len(names)
    if len(strengths) != len(names):
        raise ValueError(f"lora_strength has {len(strengths)} values for {len(names)} adapters in lora_model "
                         "(send one value for all, or one per adapter)")
    return list(strengths)
