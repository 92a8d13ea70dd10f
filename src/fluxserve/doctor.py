"""``fluxserve doctor``: is this machine ready to serve? One :class:`Check` per concern, each
``OK``, ``WARN`` or ``FAIL`` with what was found and, when something is wrong, the fix.

torch is imported lazily, inside the checks that need it; nothing here loads a model."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fluxserve.config import Settings, env_name
from fluxserve.units import parse_bytes

GIB = 1024**3
DATA_DIR_FAIL_GIB, DATA_DIR_WARN_GIB = 1, 10  # images pile up there until the retention ends
#: A model whose weights are not in the table (a local folder, another repo): its memory need is
#: its folder's size on disk (bf16 safetensors are what is loaded) plus this headroom.
HEADROOM_GIB = 2.0


@dataclass(frozen=True)
class Check:
    level: str  # OK | WARN | FAIL
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.level:<4}  {self.what:<14}  {self.detail}"


def ok(what: str, detail: str) -> Check:
    return Check("OK", what, detail)


def warn(what: str, detail: str) -> Check:
    return Check("WARN", what, detail)


def fail(what: str, detail: str) -> Check:
    return Check("FAIL", what, detail)


def run_checks(settings: Settings | None, problems: list[str] | None = None) -> Iterator[Check]:
    """Every check in turn. ``settings`` None (with ``problems``, one line per refused setting):
    the checks that need the configuration are skipped."""
    yield check_python()
    torch = _import_torch()
    yield check_torch(torch)
    if problems:
        for problem in problems:
            yield fail("settings", problem)
    elif settings is not None:
        env_file = os.environ.get("FLUXSERVE_ENV_FILE")
        yield ok("settings", "valid" + (f" (read {env_file})" if env_file else ""))
    if settings is None:
        yield from _guarded("gpu", lambda: check_gpu(torch, None))
        return
    steps: list[tuple[str, Callable[[], Check | list[Check]]]] = [
        ("gpu", lambda: check_gpu(torch, settings)),
        ("memory", lambda: check_memory(torch, settings)),
        ("weights", lambda: check_weights(settings)),
        ("disk", lambda: check_disk(settings)),
        ("database", lambda: check_database(settings)),
        ("object storage", lambda: check_object_storage(settings)),
        ("fetch policy", lambda: check_fetch_policy(settings)),
    ]
    for what, step in steps:
        yield from _guarded(what, step)


def _guarded(what: str, step: Callable[[], Check | list[Check]]) -> Iterator[Check]:
    """A check that crashed is a FAIL line saying how, not a traceback that hides the others."""
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001 - reported, and the other checks still run
        yield fail(what, f"the check itself failed: {type(exc).__name__}: {exc}")
        return
    yield from (result if isinstance(result, list) else [result])


def _import_torch():
    try:
        import torch
    except (ImportError, OSError):  # OSError: a CUDA build whose libraries don't load
        return None
    return torch


# -- python, torch, GPU ---------------------------------------------------------------------------
def check_python() -> Check:
    version = platform.python_version()
    return ok("python", f"{version} ({sys.executable})")


def check_torch(torch) -> Check:
    if torch is None:
        return fail("torch", "not importable (missing, or its CUDA libraries don't load): reinstall the pinned torch "
                             "(the Makefile's TORCH; a CUDA build for a GPU)")
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    try:
        import diffusers

        extra = f", diffusers {diffusers.__version__}"
    except ImportError:
        extra = ", diffusers missing: pip install -e ."
    return ok("torch", f"{torch.__version__} ({built}){extra}")


def _nvidia_smi() -> str | None:
    """``driver version, name, total memory`` lines from nvidia-smi, if it is installed and answers."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def _device_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def check_gpu(torch, settings: Settings | None) -> Check:
    device = settings.device if settings is not None else "auto"
    smi = _nvidia_smi()
    driver = f"; nvidia-smi: {smi.splitlines()[0]}" if smi else ""
    if device == "cpu":
        return ok("gpu", "FLUXSERVE_DEVICE=cpu: the service runs on CPU" + driver)
    if device == "mps":
        available = torch is not None and torch.backends.mps.is_available()
        return ok("gpu", "Apple MPS") if available else fail("gpu", "FLUXSERVE_DEVICE=mps but MPS is not available here")
    if torch is None or not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch is not None and not torch.version.cuda else "no CUDA device visible"
        why += " (nvidia-smi sees a GPU: install a CUDA build of torch)" if smi else ""
        if device.startswith("cuda"):
            return fail("gpu", f"FLUXSERVE_DEVICE={device} but {why}: fix the driver/torch install, or set "
                               "FLUXSERVE_DEVICE=cpu")
        return warn("gpu", f"{why}: the service runs on CPU (fine for --models tiny, very slow for real models); set "
                           "FLUXSERVE_DEVICE=cpu to say so, or install an NVIDIA driver and a CUDA build of torch")
    index = _device_index(device)
    count = torch.cuda.device_count()
    if index >= count:
        return fail("gpu", f"FLUXSERVE_DEVICE={device} but only {count} CUDA device(s): use cuda:0..cuda:{count - 1}")
    props = torch.cuda.get_device_properties(index)
    major, minor = props.major, props.minor
    detail = (f"cuda:{index} {props.name}, compute capability {major}.{minor}, {props.total_memory / GIB:.1f} GiB, "
              f"CUDA {torch.version.cuda}{driver}")
    if major < 8:
        return warn("gpu", detail + ": below 8.0 there is no fast bf16; expect slow, float16-prone generation")
    return ok("gpu", detail)


# -- memory -----------------------------------------------------------------------------------------
def model_needs(settings: Settings) -> dict[str, float]:
    """GiB each distinct weights source of the configured registry needs in memory (models sharing
    weights, such as flux-klein and realtime, load them once)."""
    from fluxserve.runtime import build_registry
    from fluxserve.weights import folder_bytes

    needs: dict[str, float] = {}
    for spec in build_registry(settings, build_tiny=False).specs():
        if spec.source in needs:
            continue
        known = spec.hub_weights
        if known is not None:
            needs[spec.source] = known.memory_gib
        else:
            folder = Path(spec.source).expanduser()
            size = folder_bytes(folder) / GIB if folder.is_dir() else None
            if settings.models == "tiny":  # built at the first start: each under 1 MB (docs/design MODELS.md)
                needs[spec.source] = size if size is not None else 0.001
            else:
                needs[spec.source] = size + HEADROOM_GIB if size is not None else -1.0
    return needs


def _amount(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(torch, settings: Settings) -> Check:
    needs = model_needs(settings)
    unknown = [source for source, gib in needs.items() if gib < 0]
    known = {source: gib for source, gib in needs.items() if gib >= 0}
    if not known:
        return warn("memory", f"sizes unknown for {', '.join(unknown)} (not built or not found yet)")
    largest_source = max(known, key=lambda s: known[s])
    largest, total = known[largest_source], sum(known.values())
    ram = _ram_bytes()
    ram_gib = ram / GIB if ram else None
    what = f"the largest model needs ~{_amount(largest)} ({largest_source}), all {len(known)} ~{_amount(total)}"
    if unknown:
        what += f" (unknown: {', '.join(unknown)})"
    on_gpu = torch is not None and torch.cuda.is_available() and settings.device not in ("cpu", "mps")
    if on_gpu:
        index = _device_index(settings.device)
        if index >= torch.cuda.device_count():
            return warn("memory", what + "; no such GPU to compare with (see the gpu line)")
        gpu_gib = torch.cuda.get_device_properties(index).total_memory / GIB
        budget_bytes = parse_bytes(settings.gpu_memory_budget) if settings.gpu_memory_budget != "auto" else None
        budget = budget_bytes / GIB if budget_bytes is not None else gpu_gib - max(0.1 * gpu_gib, 2.0)
        have = f"; GPU budget {budget:.1f} GiB of {gpu_gib:.1f} GiB" + (f", RAM {ram_gib:.1f} GiB" if ram_gib else "")
        if largest <= budget:
            spill = "" if total <= budget else " (the others wait in host memory when not in use)"
            return ok("memory", what + have + spill)
        if settings.offload != "none":
            if ram_gib is not None and largest > ram_gib:
                return fail("memory", what + have + f": with FLUXSERVE_OFFLOAD={settings.offload} the weights live in RAM, "
                                                    "which is too small; use a bigger machine or serve fewer models")
            return ok("memory", what + have + f"; FLUXSERVE_OFFLOAD={settings.offload} streams the larger ones")
        return warn("memory", what + have + ": the largest won't fit; set FLUXSERVE_OFFLOAD=model (or sequential on "
                                           "very small GPUs), or FLUXSERVE_OPTIMIZATIONS=fp8 on GPUs that have it")
    if ram_gib is None:
        return warn("memory", what + "; RAM size unknown on this system")
    have = f"; RAM {ram_gib:.1f} GiB (no GPU: models run from RAM)"
    if largest > ram_gib:
        return fail("memory", what + have + ": the largest does not fit; use a machine with a GPU or more memory, or "
                                           "override it with a smaller model (FLUXSERVE_MODEL_OVERRIDES)")
    return ok("memory", what + have)


# -- weights, disk ----------------------------------------------------------------------------------
def check_weights(settings: Settings) -> list[Check]:
    from fluxserve.runtime import build_registry
    from fluxserve.weights import CacheView, hf_cache_dir, is_hub_id, registry_status

    specs = build_registry(settings, build_tiny=False).specs()
    if settings.models == "tiny":
        folder = settings.tiny_models_dir
        built = all(Path(spec.source).is_dir() for spec in specs)
        return [ok("weights", f"tiny models {'built at' if built else 'not built yet: serve builds them at first start in'} "
                              f"{folder}")]
    cache = CacheView(hf_cache_dir())
    lines = []
    seen: set[str] = set()
    for status in registry_status(specs, cache):
        if status.source in seen:
            continue
        seen.add(status.source)
        names = ", ".join(s.name for s in specs if s.source == status.source)
        if not is_hub_id(status.source):
            lines.append(ok("weights", f"{names}: local {status.source}") if status.cached == "yes" else
                         fail("weights", f"{names}: {status.source} does not exist: fix FLUXSERVE_MODEL_OVERRIDES"))
        elif status.cached == "yes":
            lines.append(ok("weights", f"{names}: {status.source} cached ({_gib(status.size_bytes)})"))
        else:
            token = "" if not status.gated or os.environ.get("HF_TOKEN") else (
                "; it is gated: set HF_TOKEN (an account that accepted its licence) first")
            state = "partly cached" if status.cached == "partial" else "not cached"
            lines.append(warn("weights", f"{names}: {status.source} {state} (the first request downloads it, or fails "
                                         f"offline): run `fluxserve models pull {names.split(', ')[0]}`{token}"))
    return lines


def _gib(count: int | None) -> str:
    return f"{(count or 0) / GIB:.1f} GiB"


def check_disk(settings: Settings) -> list[Check]:
    from fluxserve.runtime import build_registry
    from fluxserve.weights import CacheView, free_bytes, hf_cache_dir

    free = free_bytes(settings.data_dir)
    where = f"data dir {settings.data_dir.resolve()}: {_gib(free)} free"
    if free < DATA_DIR_FAIL_GIB * GIB:
        data = fail("disk", where + f": under {DATA_DIR_FAIL_GIB} GiB; free space or move FLUXSERVE_DATA_DIR")
    elif free < DATA_DIR_WARN_GIB * GIB:
        data = warn("disk", where + f": under {DATA_DIR_WARN_GIB} GiB; images are kept FLUXSERVE_RETENTION_SECONDS")
    else:
        data = ok("disk", where)
    cache_dir = hf_cache_dir()
    cache_free = free_bytes(cache_dir)
    cache_where = f"HF cache {cache_dir}: {_gib(cache_free)} free"
    if settings.models == "tiny":
        return [data, ok("disk", cache_where + " (the tiny models need none)")]
    cache = CacheView(cache_dir)
    missing: dict[str, float] = {}
    for spec in build_registry(settings, build_tiny=False).specs():
        known = spec.hub_weights
        if known is not None and cache.state(spec.source) != "yes":
            missing[spec.source] = max(0.0, known.download_gib - (cache.size(spec.source) or 0) / GIB)
    needed = sum(missing.values())
    if needed * GIB > cache_free:
        return [data, fail("disk", cache_where + f", but the uncached models need ~{needed:.1f} GiB: free space or point "
                                                 "HF_HOME at a bigger disk")]
    return [data, ok("disk", cache_where + (f"; ~{needed:.1f} GiB still to download" if needed else ""))]


# -- database, object storage, fetch policy --------------------------------------------------------
def check_database(settings: Settings) -> Check:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(settings.resolved_database_url)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not Path(database).exists():
            folder = Path(database).parent
            probe = folder
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            if not os.access(probe, os.W_OK):
                return fail("database", f"{shown}: {probe} is not writable, so the database can't be created; fix the "
                                        "permissions or FLUXSERVE_DATA_DIR / FLUXSERVE_DATABASE_URL")
            return ok("database", f"{shown}: not created yet (serve creates it; the folder is writable)")
        engine = create_engine(url, connect_args={"timeout": 5})
    else:
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        try:
            engine = create_engine(url, connect_args={"connect_timeout": 5} if url.get_backend_name() == "postgresql" else {})
        except ModuleNotFoundError as exc:
            return fail("database", f"{shown}: driver missing ({exc.name}): pip install 'fluxserve[postgres]'")
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            version = connection.dialect.server_version_info
    except Exception as exc:  # noqa: BLE001 - any driver's failure is reported as such
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
        return fail("database", f"{shown}: SELECT 1 failed ({reason}); start the database or fix "
                                f"{env_name('database_url')}")
    finally:
        engine.dispose()
    version_text = ".".join(str(part) for part in version) if version else "?"
    return ok("database", f"{shown}: SELECT 1 answered ({url.get_backend_name()} {version_text})")


def check_object_storage(settings: Settings) -> Check:
    details = settings.s3_default_details()
    if details is None:
        return ok("object storage", f"{env_name('s3_default')} unset: images stay in the data dir (buckets set per key "
                                    "with update_s3 are checked when they are set)")
    from fluxserve.storage.s3 import S3Uploader, UploadError

    uploader = S3Uploader(attempts=1, connect_timeout=5, read_timeout=10)
    try:
        uploader.check(details)
    except UploadError as exc:
        return fail("object storage", f"{exc}; fix {env_name('s3_default')} (bucket, endpoint_url, keys)")
    finally:
        uploader.close()
    return ok("object storage", f"bucket {details.bucket!r} at {details.where()} answers HEAD")


def check_fetch_policy(settings: Settings) -> Check:
    policy = settings.fetch_policy()  # the settings validated it; this builds what the server uses
    hosts = sorted(policy._hosts)
    networks = [str(network) for network in policy._networks]
    base = ("init image URLs and webhooks may reach public addresses only (checked per request, redirects included)"
            if not hosts and not networks else "init image URLs and webhooks may reach public addresses and also "
            + "; ".join(part for part in (f"hosts {', '.join(hosts)}" if hosts else "",
                                          f"networks {', '.join(networks)}" if networks else "") if part))
    everything = [n for n in policy._networks if n.prefixlen == 0]
    if everything:
        return warn("fetch policy", base + f": {', '.join(map(str, everything))} allows every address, private ones "
                                           "too (any client can make the server fetch internal URLs): narrow "
                                           f"{env_name('fetch_allow')}")
    return ok("fetch policy", base)
