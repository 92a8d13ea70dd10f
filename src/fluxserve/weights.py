"""Model weights on this machine: where each model's weights come from, whether the Hugging Face
cache holds them (and how much disk they take), and downloading them (``fluxserve models list``,
``models pull``, ``doctor``).

The cache is read with huggingface_hub's own scanner, never over the network; only :func:`pull`
talks to the hub, and only when ``HF_HUB_OFFLINE`` is not set. No torch here.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    CacheNotFound,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from fluxserve.models import ModelSpec

#: What ``pull`` downloads of a diffusers repo: the pipeline index and the component folders.
#: Not the single-file checkpoints some repos also keep at the top (FLUX.1-dev's
#: ``flux1-dev.safetensors`` and ``ae.safetensors`` would double the download), which
#: ``from_pretrained`` never reads.
PULL_PATTERNS = ["model_index.json", "*/*"]
GIB = 1024**3
_TRUE = {"1", "on", "yes", "true"}


class PullError(RuntimeError):
    """``models pull`` can't go on; the message says why and what to do."""


def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read from the environment now (not when it was imported):
    HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds ``path`` (or would: its nearest existing parent)."""
    probe = path.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def folder_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else 0


def is_hub_id(source: str) -> bool:
    """``org/name`` and not an existing local folder (what ``from_pretrained`` would read)."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()


@dataclass(frozen=True)
class WeightsStatus:
    """One model's weights as ``models list`` shows them."""

    name: str
    family: str
    pipeline: str
    source: str
    kind: str  # "hub" | "local"
    cached: str  # "yes" | "partial" | "no" (for a local folder: whether it exists)
    size_bytes: int | None  # on disk, when cached (or present)
    licence: str
    gated: bool | None  # None: not known (a repo or folder outside the table)
    steps: int
    guidance: float
    strength: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class CacheView:
    """One scan of the hub cache (huggingface_hub's ``scan_cache_dir``): which repos it holds,
    their size and whether their newest snapshot has the pipeline's components."""

    def __init__(self, cache_dir: Path | None = None):
        self.cache_dir = cache_dir or hf_cache_dir()
        try:
            self._repos = {repo.repo_id: repo for repo in scan_cache_dir(self.cache_dir).repos if repo.repo_type == "model"}
        except CacheNotFound:
            self._repos = {}

    def size(self, repo_id: str) -> int | None:
        repo = self._repos.get(repo_id)
        return repo.size_on_disk if repo is not None else None

    def state(self, repo_id: str) -> str:
        """"yes" when a snapshot holds ``model_index.json`` and a file in each component folder it
        names; "partial" when the repo is there but incomplete; "no" when it isn't."""
        repo = self._repos.get(repo_id)
        if repo is None:
            return "no"
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            files = {str(file.file_path.relative_to(revision.snapshot_path)) for file in revision.files}
            if "model_index.json" not in files:
                continue
            folders = {name.split("/", 1)[0] for name in files if "/" in name}
            if all(component in folders for component in _components(revision.snapshot_path / "model_index.json")):
                return "yes"
        return "partial"

    def snapshot(self, repo_id: str) -> Path | None:
        repo = self._repos.get(repo_id)
        if repo is None or not repo.revisions:
            return None
        return max(repo.revisions, key=lambda r: r.last_modified).snapshot_path


def _components(model_index: Path) -> list[str]:
    """The component folders a diffusers ``model_index.json`` names (entries whose value is a
    [library, class] pair, not null)."""
    import json

    try:
        index = json.loads(model_index.read_text())
    except (OSError, ValueError):
        return []
    return [name for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None]


def weights_status(spec: ModelSpec, cache: CacheView) -> WeightsStatus:
    known = spec.hub_weights
    common: dict[str, Any] = dict(name=spec.name, family=spec.family.name, pipeline=spec.pipeline, source=spec.source,
                  steps=spec.steps, guidance=spec.guidance, strength=spec.strength)
    if is_hub_id(spec.source):
        cached = cache.state(spec.source)
        return WeightsStatus(kind="hub", cached=cached, size_bytes=cache.size(spec.source) if cached != "no" else None,
                             licence=known.licence if known else "unknown (see the repo's model card)",
                             gated=known.gated if known else None, **common)
    folder = Path(spec.source).expanduser()
    present = folder.is_dir()
    tiny = folder.parent.name == "tiny-models"
    licence = "random weights built here (fluxserve models build-tiny)" if tiny else "see the folder's model card"
    return WeightsStatus(kind="local", cached="yes" if present else "no", size_bytes=folder_bytes(folder) if present else None,
                         licence=licence, gated=False if tiny else None, **common)


def registry_status(specs: list[ModelSpec], cache: CacheView | None = None) -> list[WeightsStatus]:
    cache = cache or CacheView()
    return [weights_status(spec, cache) for spec in specs]


def human_bytes(count: int | float | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- pull ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PullPlan:
    repo_id: str
    cache_dir: Path
    needed_bytes: int | None  # None: could not be estimated (offline)
    free_bytes: int


def gated_message(repo_id: str) -> str:
    return (f"{repo_id} is gated: the hub serves its files only to accounts that accepted its licence. Accept it at "
            f"https://huggingface.co/{repo_id} and set HF_TOKEN to a token of that account (or run `hf auth login`), "
            "then pull again.")


def plan_pull(repo_id: str, cache: CacheView | None = None) -> PullPlan:
    """Estimate what a pull will write (the repo's matching files, less what the cache holds) and
    refuse (PullError) when the disk holding the cache has less free space than that."""
    cache = cache or CacheView()
    free = free_bytes(cache.cache_dir)
    if hub_offline():
        return PullPlan(repo_id, cache.cache_dir, None, free)
    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except GatedRepoError:
        raise PullError(gated_message(repo_id)) from None
    except RepositoryNotFoundError:
        raise PullError(f"{repo_id}: no such repository on the hub, or it is private or gated and HF_TOKEN is not set "
                        f"(a gated repo needs a token of an account that accepted its licence)") from None
    except (HfHubHTTPError, OSError) as exc:  # httpx's errors are OSErrors in huggingface_hub's fork
        raise PullError(f"could not ask the hub about {repo_id}: {_short(exc)}. Check the network "
                        "(or set HF_ENDPOINT to a mirror)") from None
    files = list(filter_repo_objects(info.siblings or [], allow_patterns=PULL_PATTERNS, key=lambda s: s.rfilename))
    total = sum(sibling.size or 0 for sibling in files)
    needed = max(0, total - (cache.size(repo_id) or 0))
    if free < needed:
        raise PullError(
            f"not enough disk space for {repo_id}: it needs about {human_bytes(needed)} more in {cache.cache_dir}, "
            f"which has {human_bytes(free)} free. Free some space, or point HF_HOME (or HF_HUB_CACHE) at a bigger disk.")
    return PullPlan(repo_id, cache.cache_dir, needed, free)


def download(plan: PullPlan) -> Path:
    """``snapshot_download`` of the pipeline's files into the cache (huggingface_hub shows its own
    progress bars); a refusal becomes a PullError saying what to do."""
    try:
        path = snapshot_download(plan.repo_id, cache_dir=plan.cache_dir, allow_patterns=PULL_PATTERNS)
    except GatedRepoError:
        raise PullError(gated_message(plan.repo_id)) from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as exc:
        if hub_offline():
            raise PullError(f"HF_HUB_OFFLINE is set, so {plan.repo_id} can't be downloaded and the cache "
                            f"({plan.cache_dir}) does not hold it. Unset HF_HUB_OFFLINE on a machine that reaches "
                            "huggingface.co, or copy a populated cache here and point HF_HOME at it.") from None
        raise PullError(f"could not download {plan.repo_id}: {_short(exc)}. Check the network "
                        "(or set HF_ENDPOINT to a mirror)") from None
    except RepositoryNotFoundError:
        raise PullError(f"{plan.repo_id}: no such repository on the hub, or it is gated and HF_TOKEN is not set") from None
    except (HfHubHTTPError, OSError) as exc:
        raise PullError(f"could not download {plan.repo_id}: {_short(exc)}") from None
    return Path(path)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
