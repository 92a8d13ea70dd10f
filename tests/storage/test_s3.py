"""S3 uploads against a real S3 HTTP endpoint (moto's server on loopback), and how the
update_s3 fields map to endpoint, bucket and prefix."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from fluxserve.storage.s3 import S3Details, S3Uploader, UploadError
from tests.support.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, create_bucket, running_s3, s3_client

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
ACCESS = "AKIAEXAMPLEACCESSKEY"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture(scope="module")
def s3_endpoint():
    with running_s3() as url:
        create_bucket(url, "outputs")
        create_bucket(url, "bare")
        yield url


@pytest.fixture(scope="module")
def uploader():
    up = S3Uploader(attempts=2, connect_timeout=2, read_timeout=5)
    yield up
    up.close()


def details_for(endpoint: str, image_directory: str, public_url: str = "https://cdn.example.com/generations/",
                **extra) -> S3Details:
    return S3Details.from_modelslab(
        public_url=public_url, region_name=extra.pop("region_name", "us-east-1"), endpoint_url=endpoint,
        aws_access_key_id=extra.pop("access", DUMMY_ACCESS_KEY),
        aws_secret_access_key=extra.pop("secret", DUMMY_SECRET_KEY),
        image_directory=image_directory, **extra,
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


# --- from_modelslab ----------------------------------------------------------------------------

def test_modelslab_literal_example():
    d = S3Details.from_modelslab(
        public_url="https://cdn2.stablediffusionapi.com/generations/",
        region_name="us-east-1",
        endpoint_url="https://stable-diffusion-api.s3.amazonaws.com",
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        image_directory="generations",
    )
    assert d.bucket == "stable-diffusion-api"
    assert d.endpoint_url == "https://s3.amazonaws.com"
    assert d.prefix == "generations"
    assert d.region_name == "us-east-1"
    assert d.key_for("abc.png") == "generations/abc.png"
    assert d.url_for("abc.png") == "https://cdn2.stablediffusionapi.com/generations/abc.png"


@pytest.mark.parametrize(
    ("endpoint", "bucket", "rest", "region"),
    [
        ("https://stable-diffusion-api.s3.amazonaws.com", "stable-diffusion-api", "https://s3.amazonaws.com", "us-east-1"),
        ("https://stable-diffusion-api.s3.amazonaws.com/", "stable-diffusion-api", "https://s3.amazonaws.com", "us-east-1"),
        ("https://my-bucket.s3.eu-west-1.amazonaws.com", "my-bucket", "https://s3.eu-west-1.amazonaws.com", "eu-west-1"),
        ("https://my-bucket.s3-eu-west-1.amazonaws.com", "my-bucket", "https://s3-eu-west-1.amazonaws.com", "eu-west-1"),
        ("https://my.dotted.bucket.s3.amazonaws.com", "my.dotted.bucket", "https://s3.amazonaws.com", "us-east-1"),
        ("https://Upper-Case.S3.us-west-2.AmazonAWS.com", "upper-case", "https://s3.us-west-2.amazonaws.com", "us-west-2"),
        ("https://bk1.s3.cn-north-1.amazonaws.com.cn", "bk1", "https://s3.cn-north-1.amazonaws.com.cn", "cn-north-1"),
        ("https://media.s3.us-west-1.wasabisys.com", "media", "https://s3.us-west-1.wasabisys.com", None),
        ("https://media.s3.filebase.com", "media", "https://s3.filebase.com", None),
        ("http://bkt.s3.minio.internal:9000", "bkt", "http://s3.minio.internal:9000", None),
    ],
)
def test_virtual_hosted_endpoints(endpoint, bucket, rest, region):
    d = S3Details.from_modelslab(
        public_url="https://cdn.example.com/g", region_name=None, endpoint_url=endpoint,
        aws_access_key_id=ACCESS, aws_secret_access_key=SECRET, image_directory="/generations/",
    )
    assert (d.bucket, d.endpoint_url, d.region_name, d.prefix) == (bucket, rest, region, "generations")


def test_given_region_is_kept_for_virtual_hosted():
    d = details_for("https://bk1.s3.amazonaws.com", "g", region_name="eu-west-1")
    assert (d.region_name, d.endpoint_url) == ("eu-west-1", "https://s3.amazonaws.com")
    assert details_for("https://bk1.s3.amazonaws.com", "g", region_name="").region_name == "us-east-1"


@pytest.mark.parametrize(
    ("endpoint", "directory", "bucket", "prefix"),
    [
        ("https://storage.googleapis.com", "my-bucket/generations", "my-bucket", "generations"),  # Google example
        ("https://storage.googleapis.com/", "/my-bucket//generations/2024/", "my-bucket", "generations/2024"),
        ("https://storage.googleapis.com", "my-bucket", "my-bucket", ""),
        ("https://storage.googleapis.com", "my_gcs.bucket/x", "my_gcs.bucket", "x"),
        ("https://s3.amazonaws.com", "plain-aws/out", "plain-aws", "out"),  # path-style AWS: not virtual-hosted
        ("https://s3.us-west-1.wasabisys.com", "w-bucket/a/b", "w-bucket", "a/b"),
        ("http://127.0.0.1:9000", "local/x", "local", "x"),
        (None, "aws-default/x", "aws-default", "x"),
        ("", "aws-default/x", "aws-default", "x"),
    ],
)
def test_bucket_from_image_directory(endpoint, directory, bucket, prefix):
    d = details_for(endpoint, directory)
    assert (d.bucket, d.prefix) == (bucket, prefix)
    assert d.endpoint_url == (endpoint.rstrip("/") if endpoint else None)


def test_explicit_bucket_wins_and_directory_is_all_prefix():
    d = details_for("https://storage.googleapis.com", "generations/sub/", bucket="explicit-bucket")
    assert (d.bucket, d.prefix) == ("explicit-bucket", "generations/sub")
    d = details_for("https://storage.googleapis.com", "", bucket="explicit-bucket")
    assert (d.bucket, d.prefix) == ("explicit-bucket", "")
    same = details_for("https://stable-diffusion-api.s3.amazonaws.com", "g", bucket="stable-diffusion-api")
    assert (same.bucket, same.endpoint_url) == ("stable-diffusion-api", "https://s3.amazonaws.com")
    with pytest.raises(ValueError, match="conflicts"):
        details_for("https://stable-diffusion-api.s3.amazonaws.com", "g", bucket="another-bucket")


@pytest.mark.parametrize("directory", [None, "", "/", " // "])
def test_no_bucket_anywhere(directory):
    with pytest.raises(ValueError) as caught:
        details_for("https://storage.googleapis.com", directory)
    assert str(caught.value) == (
        "bucket could not be determined: pass bucket, a virtual-hosted endpoint_url, or image_directory as bucket/prefix"
    )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"public_url": "ftp://cdn.example.com/x"}, "public_url"),
        ({"public_url": "cdn.example.com/generations/"}, "public_url"),
        ({"public_url": ""}, "public_url"),
        ({"public_url": "https://cdn.example.com/g?x=1"}, "public_url"),
        ({"endpoint_url": "s3.amazonaws.com"}, "endpoint_url"),
        ({"endpoint_url": "file:///tmp/bucket"}, "endpoint_url"),
        ({"endpoint_url": "https://user:pw@storage.googleapis.com"}, "endpoint_url"),
        ({"endpoint_url": "https://host:notaport"}, "endpoint_url"),
        ({"image_directory": "b/../etc"}, r"\.\."),
        ({"image_directory": "a/x"}, "bucket"),  # "a" is too short for a bucket name
        ({"bucket": "bad bucket"}, "bucket"),
        ({"aws_secret_access_key": ""}, "aws_secret_access_key"),
        ({"aws_access_key_id": "  "}, "aws_access_key_id"),
        ({"region_name": "us east 1"}, "region_name"),
    ],
)
def test_invalid_fields(changes, match):
    fields = dict(public_url="https://cdn.example.com/g/", region_name="us-east-1",
                  endpoint_url="https://storage.googleapis.com", aws_access_key_id=ACCESS,
                  aws_secret_access_key=SECRET, image_directory="my-bucket/g")
    fields.update(changes)
    with pytest.raises(ValueError, match=match) as caught:
        S3Details.from_modelslab(**fields)
    assert SECRET not in str(caught.value)


def test_normalisation_and_repr_hides_credentials():
    d = details_for(" https://storage.googleapis.com/// ", "my-bucket/g", public_url="https://cdn.example.com/g///",
                    secret=f" {SECRET}\n", access=ACCESS)
    assert d.endpoint_url == "https://storage.googleapis.com"
    assert d.secret_access_key == SECRET  # pasted whitespace dropped
    assert d.url_for("a.png") == "https://cdn.example.com/g/a.png"
    text = repr(d)
    assert SECRET not in text and ACCESS not in text
    assert "my-bucket" in text and "storage.googleapis.com" in text
    assert SECRET not in str(d)
    # direct construction is validated and normalised the same way
    direct = S3Details(endpoint_url=None, region_name="", bucket="my-bucket", prefix="/a//b/",
                       public_url="https://cdn.example.com", access_key_id=ACCESS, secret_access_key=SECRET)
    assert (direct.prefix, direct.region_name, direct.key_for("n.png")) == ("a/b", None, "a/b/n.png")
    with pytest.raises(ValueError):
        S3Details(endpoint_url=None, region_name=None, bucket="", prefix="", public_url="https://c.example.com",
                  access_key_id=ACCESS, secret_access_key=SECRET)


@pytest.mark.parametrize("name", ["", "../x.png", "/abs.png", "a//b.png", "a/../b.png", ".hidden", "sp ace.png",
                                  "q?.png", "x" * 600])
def test_unsafe_names_are_refused(name):
    d = details_for("https://storage.googleapis.com", "my-bucket")
    with pytest.raises(ValueError, match="unsafe"):
        d.key_for(name)
    with pytest.raises(ValueError, match="unsafe"):
        S3Uploader().upload(d, name, b"x")


# --- against the moto endpoint ------------------------------------------------------------------

def test_upload_reads_back(s3_endpoint, uploader):
    d = details_for(s3_endpoint, "outputs/generations", public_url="https://cdn.example.com/generations/")
    url = uploader.upload(d, "first.png", PNG)
    assert url == "https://cdn.example.com/generations/first.png"
    got = s3_client(s3_endpoint).get_object(Bucket="outputs", Key="generations/first.png")
    assert got["Body"].read() == PNG
    assert got["ContentType"] == "image/png"
    assert got["ContentLength"] == len(PNG)


def test_prefix_handling(s3_endpoint, uploader):
    nested = details_for(s3_endpoint, "/outputs//deep/er/", public_url="https://cdn.example.com/deep/er")
    assert uploader.upload(nested, "n.png", b"nested") == "https://cdn.example.com/deep/er/n.png"
    bare = details_for(s3_endpoint, "bare", public_url="https://bare.example.com")
    assert uploader.upload(bare, "top.png", b"top") == "https://bare.example.com/top.png"
    explicit = details_for(s3_endpoint, "gen", bucket="bare", public_url="https://bare.example.com/gen/")
    assert uploader.upload(explicit, "sub/in.jpg", b"jpg", content_type="image/jpeg") == (
        "https://bare.example.com/gen/sub/in.jpg"
    )
    client = s3_client(s3_endpoint)
    assert client.get_object(Bucket="outputs", Key="deep/er/n.png")["Body"].read() == b"nested"
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="bare")["Contents"])
    assert keys == ["gen/sub/in.jpg", "top.png"]
    assert client.head_object(Bucket="bare", Key="gen/sub/in.jpg")["ContentType"] == "image/jpeg"


def test_overwrite_and_delete(s3_endpoint, uploader):
    d = details_for(s3_endpoint, "outputs/tmp")
    uploader.upload(d, "x.png", b"one")
    uploader.upload(d, "x.png", b"two-two")
    client = s3_client(s3_endpoint)
    assert client.get_object(Bucket="outputs", Key="tmp/x.png")["Body"].read() == b"two-two"
    assert uploader.delete(d, "x.png") is True
    assert "Contents" not in client.list_objects_v2(Bucket="outputs", Prefix="tmp/")


def test_concurrent_uploads(s3_endpoint, uploader):
    d = details_for(s3_endpoint, "outputs/many")
    errors: list[BaseException] = []

    def put(i: int):
        try:
            uploader.upload(d, f"{i}.png", PNG + bytes([i]))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    listed = s3_client(s3_endpoint).list_objects_v2(Bucket="outputs", Prefix="many/")["Contents"]
    assert len(listed) == 12


def test_check(s3_endpoint, uploader):
    uploader.check(details_for(s3_endpoint, "outputs/whatever"))  # exists: no error
    missing = details_for(s3_endpoint, "no-such-bucket/g", access=ACCESS, secret=SECRET)
    with pytest.raises(UploadError) as caught:
        uploader.check(missing)
    message = str(caught.value)
    assert "'no-such-bucket'" in message and "does not exist" in message
    assert SECRET not in message and ACCESS not in message


def test_upload_to_missing_bucket(s3_endpoint, uploader):
    missing = details_for(s3_endpoint, "no-such-bucket/g", access=ACCESS, secret=SECRET)
    with pytest.raises(UploadError) as caught:
        uploader.upload(missing, "a.png", PNG)
    message = str(caught.value)
    assert message.startswith("Upload to s3://no-such-bucket/g/a.png failed: ")
    assert "does not exist" in message
    assert SECRET not in message and ACCESS not in message


def test_size_mismatch_is_an_error(s3_endpoint):
    up = S3Uploader(attempts=1)
    d = details_for(s3_endpoint, "outputs/verify")

    def lie(parsed, **_):
        parsed["ContentLength"] = 1

    up.client(d).meta.events.register("after-call.s3.HeadObject", lie)
    with pytest.raises(UploadError, match=r"verification found 1 bytes, sent \d+"):
        up.upload(d, "v.png", PNG)


def test_unreachable_endpoint_fails_after_attempts_quickly():
    endpoint = f"http://127.0.0.1:{closed_port()}"
    up = S3Uploader(attempts=3, connect_timeout=0.5, read_timeout=1)
    d = details_for(endpoint, "outputs/g", access=ACCESS, secret=SECRET)
    sends: list[str] = []
    up.client(d).meta.events.register("before-send.s3.PutObject", lambda **_: sends.append("put"))
    started = time.monotonic()
    with pytest.raises(UploadError) as caught:
        up.upload(d, "a.png", PNG)
    elapsed = time.monotonic() - started
    assert len(sends) == 3  # the configured attempts, no more
    assert elapsed < 10
    message = str(caught.value)
    assert message.startswith("Upload to s3://outputs/g/a.png failed: ")
    assert "could not connect" in message and endpoint in message
    assert SECRET not in message and ACCESS not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__

    single = S3Uploader(attempts=1, connect_timeout=0.5, read_timeout=1)
    with pytest.raises(UploadError, match="could not connect") as caught:
        single.check(d)
    assert SECRET not in str(caught.value) and ACCESS not in str(caught.value)
    assert single.delete(d, "a.png") is False  # best effort: no exception


def test_client_cache():
    up = S3Uploader()
    a = details_for("https://storage.googleapis.com", "my-bucket/a")
    a_again = details_for("https://storage.googleapis.com", "my-bucket/a")
    other_bucket = details_for("https://storage.googleapis.com", "other-bucket/b")
    other_secret = details_for("https://storage.googleapis.com", "my-bucket/a", secret="another-secret")
    other_endpoint = details_for("https://s3.us-west-1.wasabisys.com", "my-bucket/a")
    first = up.client(a)
    assert up.client(a) is first
    assert up.client(a_again) is first  # equal details, separate object
    assert up.client(other_bucket) is first  # same endpoint and credentials
    assert up.client(other_secret) is not first
    assert up.client(other_endpoint) is not first

    seen: list[object] = []
    fresh = details_for("https://storage.googleapis.com", "my-bucket/a", secret="threaded")
    barrier = threading.Barrier(8)

    def get():
        barrier.wait()
        seen.append(up.client(fresh))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and len({id(c) for c in seen}) == 1


def test_client_configuration():
    up = S3Uploader(attempts=4, connect_timeout=1.5, read_timeout=7)
    custom = up.client(details_for("https://storage.googleapis.com", "my-bucket"))
    config = custom.meta.config
    assert config.s3 == {"addressing_style": "path"}
    assert (config.connect_timeout, config.read_timeout) == (1.5, 7)
    assert config.retries["mode"] == "standard" and config.retries["total_max_attempts"] == 4
    assert custom.meta.endpoint_url == "https://storage.googleapis.com"
    aws = up.client(details_for(None, "my-bucket", region_name="eu-central-1"))
    assert not (aws.meta.config.s3 or {}).get("addressing_style")
    assert aws.meta.region_name == "eu-central-1"


# --- the Storage protocol ------------------------------------------------------------------------

def test_s3_storage_is_a_storage_that_saves_reads_and_checks(s3_endpoint, uploader, tmp_path):
    from fluxserve.storage.base import Storage
    from fluxserve.storage.local import LocalStorage
    from fluxserve.storage.s3 import S3Storage

    bucket = S3Storage(details_for(s3_endpoint, "outputs/protocol"), uploader)
    local = LocalStorage(tmp_path, "http://127.0.0.1:8000")
    for storage, url in ((bucket, "https://cdn.example.com/generations/p.png"),
                         (local, "http://127.0.0.1:8000/outputs/p.png")):
        assert isinstance(storage, Storage)
        assert storage.url_for("p.png") == url
        assert storage.save("p.png", PNG) == url
        assert storage.read("p.png") == PNG
        storage.check()
        with pytest.raises(FileNotFoundError):
            storage.read("missing.png")
    assert s3_client(s3_endpoint).get_object(Bucket="outputs", Key="protocol/p.png")["Body"].read() == PNG
    with pytest.raises(UploadError, match="does not exist"):
        S3Storage(details_for(s3_endpoint, "no-such-bucket"), uploader).check()
