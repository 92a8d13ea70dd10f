"""``fluxserve generate``: one request to a running server, followed live, its images saved as PNGs.

1. ``GET /api/fluxserve/catalog`` says which paths serve which task and model: the task follows from
   the inputs (a mask: inpainting; init images: image to image; else text to image) and the path
   is the model's own (an enterprise server) or one that takes its ``model_id``.
2. The request is sent with ``instant_response: true`` and an ``Idempotency-Key`` (a uuid4, the
   same on every retry after a connection error or a 502/503/504, so a retried send never queues
   twice). Local files go as base64 ``data:`` URIs, URLs as they are.
3. The job's event stream (``/api/fluxserve/jobs/{id}/events``) drives the progress display:
   queue position, then step i of n; its last event, ``done``, is the fetch answer. A stream cut
   short (a restarting server sends ``shutdown``; a dropped connection) is opened again until the
   timeout, since the request is kept.
4. Every output URL is downloaded (``.base64`` files decoded, a ``data:`` prefix stripped) and
   saved as ``<id>-<n>.png`` in the output folder.

Errors are :class:`ClientError` with the server's message; the CLI prints it and exits 1.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import mimetypes
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

if TYPE_CHECKING:
    from rich.console import Console

CATALOG_PATH = "/api/fluxserve/catalog"
EVENTS_PATH = "/api/fluxserve/jobs/{id}/events"
RETRY_STATUSES = frozenset({502, 503, 504})
SUBMIT_ATTEMPTS = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASK_WORDS = {"text2img": "text-to-image", "img2img": "image-to-image", "inpaint": "inpainting"}


class ClientError(RuntimeError):
    """Something the user must be told (on stderr, exit status 1)."""


@dataclass
class GenerateRequest:
    prompt: str
    model: str | None = None
    init_images: list[str] = field(default_factory=list)  # paths or http(s) URLs
    mask: str | None = None
    seed: int | None = None
    samples: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    strength: float | None = None
    guidance: float | None = None
    negative_prompt: str | None = None

    @property
    def task(self) -> str:
        if self.mask is not None:
            if not self.init_images:
                raise ClientError("--mask needs --init-image: the image whose masked part is repainted")
            return "inpaint"
        return "img2img" if self.init_images else "text2img"


@dataclass(frozen=True)
class Route:
    path: str
    model: str
    takes_model_id: bool


def choose_route(catalog: dict[str, Any], task: str, model: str | None) -> Route:
    """The path for ``task`` (and ``model``, a name or alias in any case) from the server's catalog:
    without a model, the first path serving the task with its default model; with one, the model's
    own path if it has one, else the first path that takes it as ``model_id``."""
    paths = [p for p in catalog.get("paths", []) if p.get("task") == task]
    if not paths:
        raise ClientError(f"this server has no {TASK_WORDS.get(task, task)} path")
    if model is None:
        first = next((p for p in paths if p.get("default_model")), None)
        if first is None:
            raise ClientError(f"this server needs --model for {TASK_WORDS.get(task, task)}")
        return Route(first["path"], first["default_model"], bool(first.get("takes_model_id")))
    wanted = model.strip().lower()
    spec = next((m for m in catalog.get("models", [])
                 if wanted in (m["name"].lower(), *(alias.lower() for alias in m.get("aliases", [])))), None)
    if spec is None:
        names = ", ".join(m["name"] for m in catalog.get("models", []))
        raise ClientError(f"unknown model {model!r}; this server serves: {names}")
    name = spec["name"]
    own = next((p for p in paths if p.get("model") == name), None)
    chosen = own or next((p for p in paths if p.get("takes_model_id") and name in p.get("models", [])), None)
    if chosen is None:
        able = sorted({m for p in paths for m in p.get("models", [])})
        raise ClientError(f"{name} can't do {TASK_WORDS.get(task, task)}; models here that can: {', '.join(able)}")
    return Route(chosen["path"], name, bool(chosen.get("takes_model_id")))


def image_field(value: str) -> str:
    """An http(s) URL as it is; a local file as a base64 ``data:`` URI (the API takes those)."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    path = Path(value).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ClientError(f"can't read {value}: {exc.strerror or exc}") from None
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def request_body(request: GenerateRequest, route: Route) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": request.prompt, "samples": request.samples, "instant_response": True}
    if route.takes_model_id:
        body["model_id"] = route.model
    optional = {"seed": request.seed, "width": request.width, "height": request.height,
                "num_inference_steps": request.steps, "strength": request.strength,
                "guidance_scale": request.guidance, "negative_prompt": request.negative_prompt}
    body.update({name: value for name, value in optional.items() if value is not None})
    if request.init_images:
        images = [image_field(item) for item in request.init_images]
        body["init_image"] = images[0] if len(images) == 1 else images
    if request.mask is not None:
        body["mask_image"] = image_field(request.mask)
    return body


# -- progress ------------------------------------------------------------------------------------
class ProgressView(Protocol):
    def submitted(self, job_id: int, route: Route) -> None: ...
    def queued(self, position: int, eta: float | None) -> None: ...
    def step(self, step: int, total: int) -> None: ...
    def note(self, message: str) -> None: ...
    def finished(self, status: str) -> None: ...


class PlainProgress:
    """One line per change (for logs and pipes: stderr is not a terminal)."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.job_id: int | None = None
        self.last: tuple | None = None

    def submitted(self, job_id: int, route: Route) -> None:
        self.job_id = job_id
        self.echo(f"request {job_id}: {route.model} via {route.path}")

    def _say(self, key: tuple, text: str) -> None:
        if key != self.last:
            self.last = key
            self.echo(f"request {self.job_id}: {text}")

    def queued(self, position: int, eta: float | None) -> None:
        self._say(("queued", position), f"queued, position {position}" + (f" (eta {eta:.1f} s)" if eta is not None else ""))

    def step(self, step: int, total: int) -> None:
        self._say(("step", step, total), f"step {step}/{total}")

    def note(self, message: str) -> None:
        self.echo(f"request {self.job_id}: {message}")

    def finished(self, status: str) -> None:
        self.echo(f"request {self.job_id}: {status}")


class RichProgress:
    """A live ``rich`` progress bar: the queue position while queued, then the steps."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.task: Any = None
        self.job_id: int | None = None

    def submitted(self, job_id: int, route: Route) -> None:
        self.job_id = job_id
        self.progress.start()
        self.task = self.progress.add_task(f"request {job_id} ({route.model}): sent", total=None)

    def queued(self, position: int, eta: float | None) -> None:
        eta_text = f", eta {eta:.1f} s" if eta is not None else ""
        self.progress.update(self.task, description=f"request {self.job_id}: queued, position {position}{eta_text}",
                             total=None)

    def step(self, step: int, total: int) -> None:
        self.progress.update(self.task, description=f"request {self.job_id}: step {step}/{total}", total=total,
                             completed=step)

    def note(self, message: str) -> None:
        self.progress.console.print(message)

    def finished(self, status: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"request {self.job_id}: {status}")
        self.progress.stop()


# -- the client ----------------------------------------------------------------------------------
def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a Server-Sent Events stream (comments and pings skipped)."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300].strip() or response.reason_phrase}"
    if isinstance(body, dict):
        text = body.get("message") or body.get("messege") or body.get("detail") or body
        retry = f" (retry after {body['retry_after']} s)" if body.get("retry_after") is not None else ""
        return f"{text}{retry}"
    return str(body)


class GenerateClient:
    def __init__(self, base_url: str, key: str, *, timeout: float = 600.0, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.timeout = timeout
        self.sleep = sleep
        self.http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(30.0, read=60.0), transport=transport,
                                 follow_redirects=True)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GenerateClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- steps ----------------------------------------------------------------------------------
    def catalog(self) -> dict[str, Any]:
        try:
            response = self.http.get(CATALOG_PATH)
        except httpx.TransportError as exc:
            raise ClientError(f"can't reach {self.base_url}: {exc or type(exc).__name__} "
                              "(is `fluxserve serve` running there? set --url or FLUXSERVE_URL)") from None
        if response.status_code == 404:
            raise ClientError(f"{self.base_url} has no {CATALOG_PATH}: is it a fluxserve server?")
        if response.status_code != 200:
            raise ClientError(f"catalog: {_message(response)}")
        return response.json()

    def submit(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST once, retrying connection errors and 502/503/504 with the same Idempotency-Key."""
        headers = {"Key": self.key, "Idempotency-Key": str(uuid.uuid4())}
        delay = 0.5
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            try:
                response = self.http.post(path, json=body, headers=headers)
            except httpx.TransportError as exc:
                if attempt == SUBMIT_ATTEMPTS:
                    raise ClientError(f"can't reach {self.base_url}: {exc or type(exc).__name__}") from None
            else:
                if response.status_code not in RETRY_STATUSES or attempt == SUBMIT_ATTEMPTS:
                    break
            self.sleep(delay)
            delay *= 2
        if response.status_code != 200:
            raise ClientError(_message(response))
        answer = response.json()
        if answer.get("status") in ("error", "failed"):
            raise ClientError(answer.get("message") or json.dumps(answer))
        return answer

    def follow(self, job_id: int, view: ProgressView, fetch_result: str | None) -> dict[str, Any]:
        """The job's final answer (the event stream's ``done``), showing its progress on ``view``;
        the stream is reopened after a ``shutdown`` event or a dropped connection until the timeout."""
        deadline = time.monotonic() + self.timeout
        delay = 0.5
        while True:
            try:
                with self.http.stream("GET", EVENTS_PATH.format(id=job_id), headers={"Key": self.key}) as response:
                    if response.status_code != 200:
                        response.read()
                        raise ClientError(_message(response))
                    delay = 0.5
                    for event, data in sse_events(response.iter_lines()):
                        payload = json.loads(data) if data else {}
                        if event == "queued":
                            view.queued(int(payload.get("position", 0)), payload.get("eta"))
                        elif event == "progress" and payload.get("total"):
                            view.step(int(payload.get("step") or 0), int(payload["total"]))
                        elif event == "done":
                            return payload
                        elif event == "shutdown":
                            view.note(payload.get("message") or "the server is restarting")
                            break
            except httpx.TransportError:
                pass  # the server went away (or the connection dropped): the request is kept
            if time.monotonic() + delay > deadline:
                where = f" at {fetch_result}" if fetch_result else ""
                raise ClientError(f"request {job_id} did not finish within {self.timeout:.0f} s; it is kept: fetch it "
                                  f"later{where}")
            self.sleep(delay)
            delay = min(delay * 2, 5.0)

    def download(self, url: str) -> bytes:
        """One output as PNG bytes: a PNG URL, a ``.base64`` file's URL or an inline base64 string."""
        if url.startswith("data:") or not url.startswith(("http://", "https://")):
            return _png(_decode_base64(url), url)
        try:
            response = self.http.get(url, timeout=httpx.Timeout(30.0, read=120.0))  # public URLs: no key sent
        except httpx.TransportError as exc:
            raise ClientError(f"can't download {url}: {exc or type(exc).__name__}") from None
        if response.status_code != 200:
            raise ClientError(f"can't download {url}: HTTP {response.status_code}")
        content = response.content
        if url.split("?", 1)[0].endswith(".base64"):
            content = _decode_base64(content.decode("ascii", errors="replace"))
        return _png(content, url)


def _decode_base64(text: str) -> bytes:
    text = text.strip()
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ClientError("an output is not valid base64") from None


def _png(data: bytes, where: str) -> bytes:
    """``data`` as PNG bytes (converted when the server stored another format)."""
    if data.startswith(PNG_MAGIC):
        return data
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()
    except (UnidentifiedImageError, OSError):
        raise ClientError(f"{where} is not an image") from None


def generate(request: GenerateRequest, *, base_url: str, key: str, out_dir: Path, view: ProgressView,
             timeout: float = 600.0, transport: httpx.BaseTransport | None = None) -> list[Path]:
    """Run one request to the end and save its images; returns the saved paths."""
    if not key:
        raise ClientError("no API key: pass --key or set FLUXSERVE_KEY (create one with `fluxserve keys create NAME`)")
    task = request.task
    with GenerateClient(base_url, key, timeout=timeout, transport=transport) as client:
        route = choose_route(client.catalog(), task, request.model)
        answer = client.submit(route.path, request_body(request, route))
        job_id = int(answer["id"])
        view.submitted(job_id, route)
        try:
            if answer.get("status") != "success":
                answer = client.follow(job_id, view, answer.get("fetch_result"))
        except BaseException:
            view.finished("stopped")
            raise
        status = answer.get("status")
        view.finished(status or "?")
        if status != "success":
            raise ClientError(f"request {job_id} {status or 'ended'}: {answer.get('message') or json.dumps(answer)}")
        outputs = answer.get("output") or []
        if not outputs:
            raise ClientError(f"request {job_id} has no images: {answer.get('message') or 'the answer listed none'}")
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        for index, url in enumerate(outputs):
            path = out_dir / f"{job_id}-{index}.png"
            path.write_bytes(client.download(url))
            saved.append(path)
        return saved
