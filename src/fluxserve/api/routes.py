"""The ModelsLab routes. Thin: parse (FastAPI + api.schemas), authenticate, delegate."""

from __future__ import annotations

from fastapi import APIRouter, Body
from fastapi.responses import FileResponse, JSONResponse

from fluxserve.api.deps import AuthKey, ServicesDep
from fluxserve.api.errors import ApiError
from fluxserve.api.schemas import (
    FetchBody,
    FluxImg2ImgBody,
    KleinImg2ImgBody,
    KontextBody,
    RealtimeImg2ImgBody,
    Text2ImgBody,
)

enterprise = APIRouter(prefix="/api/v1/enterprise", tags=["enterprise"])
v6 = APIRouter(prefix="/api/v6", tags=["v6"])
files = APIRouter(tags=["files"])

KONTEXT_PIPELINES = ("FluxKontextPipeline",)
OptionalFetchBody = Body(None)


# -- FLUX.2 klein ------------------------------------------------------------------------------
@enterprise.post("/flux_klein/text2img")
async def flux_klein_text2img(body: Text2ImgBody, key: AuthKey, services: ServicesDep) -> JSONResponse:
    return await services.generation.submit(key, body.to_request("flux_klein"))


@enterprise.post("/flux_klein/img2img")
async def flux_klein_img2img(body: KleinImg2ImgBody, key: AuthKey, services: ServicesDep) -> JSONResponse:
    return await services.generation.submit(key, body.to_request("flux_klein"))


# -- realtime (FLUX.2 klein by default) --------------------------------------------------------
@enterprise.post("/realtime/text2img")
async def realtime_text2img(body: Text2ImgBody, key: AuthKey, services: ServicesDep) -> JSONResponse:
    return await services.generation.submit(key, body.to_request("realtime"))


@enterprise.post("/realtime/img2img")
async def realtime_img2img(body: RealtimeImg2ImgBody, key: AuthKey, services: ServicesDep) -> JSONResponse:
    return await services.generation.submit(key, body.to_request("realtime"))


@v6.post("/realtime/text2img")
async def v6_realtime_text2img(body: Text2ImgBody, key: AuthKey, services: ServicesDep) -> JSONResponse:
    return await services.generation.submit(key, body.to_request("v6_realtime"))


@v6.post("/realtime/img2img")
async def v6_realtime_img2img(body: RealtimeImg2ImgBody, key: AuthKey, services: ServicesDep) -> JSONResponse:
    return await services.generation.submit(key, body.to_request("v6_realtime"))


# -- FLUX.1 img2img ------------------------------------------------------------------------------
@enterprise.post("/flux/img2img")
async def flux_img2img(body: FluxImg2ImgBody, key: AuthKey, services: ServicesDep) -> JSONResponse:
    return await services.generation.submit(key, body.to_request("flux"))


# -- Flux Kontext ------------------------------------------------------------------------------
@v6.post("/images/img2img")
async def kontext_img2img(body: KontextBody, key: AuthKey, services: ServicesDep) -> JSONResponse:
    return await services.generation.submit(key, body.to_request("v6"), pipelines=KONTEXT_PIPELINES)


# -- fetch -------------------------------------------------------------------------------------
def _job_id(raw: str | int | None) -> int:
    try:
        return int(str(raw).strip())
    except (TypeError, ValueError):
        raise ApiError(404, "Request not found") from None


@enterprise.post("/{server}/fetch/{job_id}")
async def enterprise_fetch(server: str, job_id: str, key: AuthKey, services: ServicesDep) -> JSONResponse:
    if server not in ("flux_klein", "realtime", "flux"):
        raise ApiError(404, "Not found")
    return await services.generation.fetch(key, _job_id(job_id))


@v6.post("/images/fetch/{job_id}")
@v6.post("/realtime/fetch/{job_id}")
async def v6_fetch(job_id: str, key: AuthKey, services: ServicesDep) -> JSONResponse:
    return await services.generation.fetch(key, _job_id(job_id))


@v6.post("/images/fetch")
async def v6_fetch_by_body(key: AuthKey, services: ServicesDep, body: FetchBody = OptionalFetchBody) -> JSONResponse:
    if body is None or body.request_id is None:
        raise ApiError(400, "request_id is required")
    return await services.generation.fetch(key, body.request_id)


# -- output files --------------------------------------------------------------------------------
@files.get("/outputs/{name}", response_class=FileResponse)
async def output_file(name: str, services: ServicesDep) -> FileResponse:
    path = services.generation.storage.path_for(name)
    if path is None or not path.is_file():
        raise ApiError(404, "File not found")
    return FileResponse(path, media_type="image/png")

