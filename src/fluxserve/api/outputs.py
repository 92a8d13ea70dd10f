"""``GET /outputs/<name>``: the images kept on this server's disk, or, on a replica whose disk
lacks them, the server's copies in the shared bucket (``storage.shared``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse, Response

from fluxserve.api.deps import ServicesDep
from fluxserve.api.errors import ApiError
from fluxserve.storage.s3 import UploadError

outputs_router = APIRouter(tags=["files"])


@outputs_router.get("/outputs/{name}", response_class=FileResponse)
async def output_file(name: str, services: ServicesDep) -> Response:
    storage = services.generation.storage
    path = storage.path_for(name)
    if path is None:
        raise ApiError(404, "File not found")
    # the images, and with base64 answers the text files of their base64 (ModelsLab's .base64 links)
    media_type = "text/plain" if name.endswith(".base64") else "image/png"
    if path.is_file():
        return FileResponse(path, media_type=media_type)
    shared = getattr(storage, "shared", None)
    if shared is None:
        raise ApiError(404, "File not found")
    try:  # made by a worker on another node: the bucket has the server's copy
        if services.generation.settings.outputs_from_bucket == "redirect":
            if not await run_in_threadpool(shared.outputs.exists, name):
                raise ApiError(404, "File not found")
            return RedirectResponse(await run_in_threadpool(shared.outputs.presigned_url, name), status_code=302)
        data = await run_in_threadpool(shared.outputs.read, name)
    except FileNotFoundError:
        raise ApiError(404, "File not found") from None
    except UploadError as exc:
        raise ApiError(503, "Service temporarily unavailable", retry_after=10,
                       reason=f"object_store unavailable: {exc}") from None
    return Response(data, media_type=media_type)
