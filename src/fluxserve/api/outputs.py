"""``GET /outputs/<name>``: the images kept on this server's disk."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from fluxserve.api.deps import ServicesDep
from fluxserve.api.errors import ApiError

outputs_router = APIRouter(tags=["files"])


@outputs_router.get("/outputs/{name}", response_class=FileResponse)
async def output_file(name: str, services: ServicesDep) -> FileResponse:
    path = services.generation.storage.path_for(name)
    if path is None or not path.is_file():
        raise ApiError(404, "File not found")
    # the images, and with base64 answers the text files of their base64 (ModelsLab's .base64 links)
    return FileResponse(path, media_type="text/plain" if name.endswith(".base64") else "image/png")
