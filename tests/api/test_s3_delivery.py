"""S3 delivery through the API against a real S3-compatible server on loopback (moto):
update_s3 / reset_s3, uploads read back, public URLs, no expiry, temp, upload failures."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from tests.support.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, create_bucket, running_s3, s3_client
from tests.support.servers import live_server
from tests.support.waiting import KLEIN_FETCH, wait_for_job

KLEIN = "/api/v1/enterprise/flux_klein/text2img"
PUBLIC = "https://cdn.example.test/generations"


@pytest.fixture(scope="module")
def s3_endpoint():
    with running_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory, tiny_root):
    with live_server(tmp_path_factory.mktemp("s3"), tiny_root, retention_seconds=2, janitor_interval_seconds=0.2,
                     s3_upload_attempts=2) as live:
        yield live


def s3_body(key, endpoint, bucket, **extra):
    return {"key": key, "deploy_type": "flux", "public_url": PUBLIC + "/", "region_name": "us-east-1",
            "endpoint_url": endpoint, "aws_access_key_id": DUMMY_ACCESS_KEY,
            "aws_secret_access_key": DUMMY_SECRET_KEY, "image_directory": f"{bucket}/generations", **extra}


def small(key, **extra):
    return {"key": key, "prompt": "a cat", "width": 256, "height": 256, "num_inference_steps": 1, **extra}


def test_images_go_to_the_keys_bucket_and_do_not_expire(s3_server, s3_endpoint):
    bucket = create_bucket(s3_endpoint, "team-images")
    with s3_server.client() as client:
        updated = client.post("/api/v1/enterprise/update_s3", json=s3_body(s3_server.key, s3_endpoint, bucket))
        assert updated.status_code == 200, updated.text
        assert updated.json()["status"] == "success" and DUMMY_SECRET_KEY not in updated.text
        queued = client.post(KLEIN, json=small(s3_server.key, samples=2, instant_response=True)).json()
        assert all(link.startswith(PUBLIC + "/") for link in queued["future_links"])
        done = wait_for_job(client, s3_server.key, queued["id"], fetch=KLEIN_FETCH).json()
        assert done["status"] == "success" and done["output"] == queued["future_links"]
        objects = s3_client(s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="generations/")["Contents"]
        names = {obj["Key"].removeprefix("generations/") for obj in objects}
        assert names == {url.rsplit("/", 1)[1] for url in done["output"]}
        for url in done["output"]:
            body = s3_client(s3_endpoint).get_object(Bucket=bucket, Key="generations/" + url.rsplit("/", 1)[1])
            assert body["ContentType"] == "image/png"
            assert Image.open(io.BytesIO(body["Body"].read())).size == (256, 256)
        # the local copy expires (retention 2 s), the bucket's copies and the answer stay
        deadline = time.monotonic() + 30
        while s3_server.jobs.get(queued["id"]).expired_at is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s3_server.jobs.get(queued["id"]).expired_at is not None
        later = client.post(f"/api/v1/enterprise/flux_klein/fetch/{queued['id']}", json={"key": s3_server.key}).json()
        assert later["status"] == "success" and later["output"] == done["output"]
        assert len(s3_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]) == 2
        # temp: local and expiring, even with S3 details
        temp = client.post(KLEIN, json=small(s3_server.key, temp=True)).json()
        assert temp["output"][0].startswith(s3_server.base_url + "/outputs/")
        # other keys are unaffected
        other = client.post(KLEIN, json=small(s3_server.other_key)).json()
        assert other["output"][0].startswith(s3_server.base_url + "/outputs/")
        # the secret is stored encrypted
        db_bytes = b"".join(p.read_bytes() for p in s3_server.settings.data_dir.glob("fluxserve.db*"))
        assert DUMMY_SECRET_KEY.encode() not in db_bytes
        # reset: local again
        reset = client.post("/api/v1/enterprise/reset_s3", json={"key": s3_server.key, "deploy_type": "flux"})
        assert reset.json()["status"] == "success"
        local = client.post(KLEIN, json=small(s3_server.key)).json()
        assert local["output"][0].startswith(s3_server.base_url + "/outputs/")
        again = client.post("/api/v1/enterprise/reset_s3", json={"key": s3_server.key, "deploy_type": "flux"})
        assert again.status_code == 404 and again.json()["status"] == "error"


def test_a_failed_upload_fails_the_job_with_a_clear_message_and_its_webhook(s3_server, s3_endpoint):
    bucket = create_bucket(s3_endpoint, "short-lived")
    with s3_server.client() as client:
        assert client.post("/api/v1/enterprise/update_s3", json=s3_body(s3_server.key, s3_endpoint, bucket,
                                                                        deploy_type="text_to_image")).status_code == 200
        s3_client(s3_endpoint).delete_bucket(Bucket=bucket)  # the bucket disappears after setup
        failed = client.post(KLEIN, json=small(s3_server.key, webhook="http://127.0.0.1:9/hook", track_id="t"))
        assert failed.status_code == 200  # served: the job failed
        body = failed.json()
        assert body["status"] == "failed" and body["track_id"] == "t"
        assert body["message"].startswith(f"Upload to s3://{bucket}/generations/") and "does not exist" in body["message"]
        assert DUMMY_SECRET_KEY not in failed.text and DUMMY_ACCESS_KEY not in failed.text
        assert s3_server.jobs.webhook_status(body["id"]) in ("pending", "failed")  # the failure webhook was queued
        job = s3_server.jobs.get(body["id"])  # a job that fails leaves no files behind
        assert not any((s3_server.settings.outputs_dir / name).exists() for name in job.output_names())
        client.post("/api/v1/enterprise/reset_s3", json={"key": s3_server.key})


@pytest.mark.parametrize("change,status,message", [
    ({"public_url": None}, 400, "public_url is required"),
    ({"aws_secret_access_key": None}, 400, "aws_secret_access_key is required"),
    ({"public_url": "ftp://x/y"}, 400, "public_url"),
    ({"image_directory": ""}, 400, "bucket could not be determined"),
    ({"image_directory": "no-such-bucket/x"}, 400, "S3 details do not work: "),
    ({"endpoint_url": "http://169.254.169.254"}, 400, "endpoint_url refused: "),
])
def test_update_s3_refusals(s3_server, s3_endpoint, change, status, message):
    bucket = create_bucket(s3_endpoint, "refusals")
    body = s3_body(s3_server.key, s3_endpoint, bucket)
    for name, value in change.items():
        if value is None:
            body.pop(name)
        else:
            body[name] = value
    with s3_server.client() as client:
        response = client.post("/api/v1/enterprise/update_s3", json=body)
    assert response.status_code == status
    assert response.json()["status"] == "error" and message in response.json()["message"]
    assert DUMMY_SECRET_KEY not in response.text


def test_server_default_bucket(tmp_path, tiny_root, s3_endpoint):
    bucket = create_bucket(s3_endpoint, "server-default")
    default = {"public_url": "https://images.example.test/", "endpoint_url": s3_endpoint, "region_name": "us-east-1",
               "aws_access_key_id": DUMMY_ACCESS_KEY, "aws_secret_access_key": DUMMY_SECRET_KEY, "bucket": bucket}
    with live_server(tmp_path, tiny_root, s3_default=default) as live, live.client() as client:
        result = client.post(KLEIN, json=small(live.key)).json()
        assert result["status"] == "success" and result["output"][0].startswith("https://images.example.test/")
        keys = [obj["Key"] for obj in s3_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
        assert keys == [result["output"][0].rsplit("/", 1)[1]]
