"""ModelsLab's update_s3 / reset_s3: a key's own bucket for its images."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from fluxserve.api.deps import AuthKey, ServicesDep
from fluxserve.api.errors import ApiError
from fluxserve.api.schemas import Text
from fluxserve.fetching import FetchError, UrlRefused, check_target
from fluxserve.storage.configs import DEFAULT_DEPLOY_TYPE
from fluxserve.storage.s3 import S3Details, UploadError

storage_router = APIRouter(prefix="/api/v1/enterprise", tags=["enterprise storage"])


class UpdateS3Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    key: Text = None
    deploy_type: Text = Field(None, description="Server type the details apply to (default text_to_image).")
    public_url: Text = Field(None, description="Where uploaded images can be read (includes the directory).")
    region_name: Text = None
    endpoint_url: Text = Field(None, description="S3 endpoint (any S3-compatible service).")
    aws_access_key_id: Text = None
    aws_secret_access_key: Text = Field(None, description="Stored encrypted; never echoed.")
    image_directory: Text = Field(None, description="Key prefix (or bucket/prefix when the endpoint names no bucket).")
    bucket: Text = Field(None, description="Ours: the bucket, when neither endpoint_url nor image_directory names it.")


class ResetS3Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    key: Text = None
    deploy_type: Text = None


@storage_router.post("/update_s3")
async def update_s3(body: UpdateS3Body, key: AuthKey, services: ServicesDep) -> dict:
    for name in ("public_url", "endpoint_url", "aws_access_key_id", "aws_secret_access_key"):
        if not getattr(body, name):
            raise ApiError(400, f"{name} is required")
    assert body.public_url and body.aws_access_key_id and body.aws_secret_access_key  # checked just above
    try:
        details = S3Details.from_modelslab(
            public_url=body.public_url, region_name=body.region_name, endpoint_url=body.endpoint_url,
            aws_access_key_id=body.aws_access_key_id, aws_secret_access_key=body.aws_secret_access_key,
            image_directory=body.image_directory or "", bucket=body.bucket,
        )
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    settings = services.generation.settings
    try:  # the endpoint is a stranger's URL too: no uploads into our own network
        if details.endpoint_url is None:  # a blank one ("  " passes the required check): what check_target says of None
            raise UrlRefused("not a valid URL")
        await run_in_threadpool(check_target, details.endpoint_url, settings.fetch_policy())
    except FetchError as exc:
        raise ApiError(400, f"endpoint_url refused: {exc}") from None
    try:
        await run_in_threadpool(services.storage_configs.for_details(details).check)
    except UploadError as exc:
        raise ApiError(400, f"S3 details do not work: {exc}") from None
    deploy_type = body.deploy_type or DEFAULT_DEPLOY_TYPE
    await run_in_threadpool(services.storage_configs.put, key.id, deploy_type, details)
    return {"status": "success", "message": "S3 details updated", "deploy_type": deploy_type,
            "bucket": details.bucket, "image_directory": details.prefix, "public_url": details.public_url}


@storage_router.post("/reset_s3")
async def reset_s3(body: ResetS3Body, key: AuthKey, services: ServicesDep) -> dict:
    deploy_type = body.deploy_type or DEFAULT_DEPLOY_TYPE
    removed = await run_in_threadpool(services.storage_configs.remove, key.id, deploy_type)
    if not removed:
        raise ApiError(404, f"No S3 details stored for deploy_type {deploy_type}")
    return {"status": "success", "deploy_type": deploy_type,
            "message": "S3 details removed: images are stored on this server and deleted after the retention period"}
