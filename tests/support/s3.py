"""A real S3 endpoint for tests: moto's server on loopback, in a thread of the test process."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
import botocore.config

DUMMY_ACCESS_KEY = "AKIATESTTESTTESTTEST"
DUMMY_SECRET_KEY = "dummy/secret+key/for/moto/0123456789abcd"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_s3() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (a free port); yield ``http://127.0.0.1:PORT``.

    moto keeps its state per process, so the state is reset on start: each server begins empty."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        reset = urllib.request.Request(f"{url}/moto-api/reset", data=b"", method="POST")
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(reset, timeout=10):
            pass
        yield url
    finally:
        server.stop()


def s3_client(endpoint_url: str, *, access_key: str = DUMMY_ACCESS_KEY, secret_key: str = DUMMY_SECRET_KEY):
    """A plain boto3 client for the moto endpoint (dummy credentials, us-east-1, path style)."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )


def create_bucket(endpoint_url: str, name: str) -> str:
    """Create ``name`` on the moto endpoint (us-east-1); return the name."""
    s3_client(endpoint_url).create_bucket(Bucket=name)
    return name
