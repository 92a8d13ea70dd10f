"""Shared fixtures: the tiny pipelines (built once per run), a loopback server with init
images, and a live fluxserve server on loopback serving the tiny models."""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub, even by accident

import pytest
from PIL import Image

from fluxserve.engine.tiny import build_tiny_models
from tests.support.postgres import PostgresUnavailable, create_database, postgres_required, running_postgres
from tests.support.servers import live_server, static_server


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """URL of one real PostgreSQL server for the whole run (skipped if absent, unless required:
    FLUXSERVE_REQUIRE_POSTGRES=1, as in CI). Tests create their own databases on it."""
    try:
        with running_postgres(tmp_path_factory.mktemp("postgres")) as url:
            yield url
    except PostgresUnavailable as exc:
        if postgres_required():
            pytest.fail(f"FLUXSERVE_REQUIRE_POSTGRES=1 but {exc}")
        pytest.skip(str(exc))


@pytest.fixture
def database_url(postgres_server):
    """A fresh, empty database of its own on the run's PostgreSQL server, for a test whose
    processes share it (API and worker roles, a local cluster)."""
    return create_database(postgres_server, f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(root)
    return root


def make_test_image(width: int = 256, height: int = 256, seed: int = 0) -> Image.Image:
    """A deterministic, textured RGB picture (not flat: the pipelines and the NSFW model see detail)."""
    base = Image.effect_mandelbrot((width, height), (-2.0 + seed * 0.1, -1.5, 1.0, 1.5), 60).convert("RGB")
    noise = Image.effect_noise((width, height), 40 + seed).convert("RGB")
    return Image.blend(base, noise, 0.3)


def make_mask(side: int) -> Image.Image:
    """Black (keep) with a white (repaint) square over the middle half."""
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    return mask


@pytest.fixture(scope="session")
def image_host(tmp_path_factory):
    """Base URL of a loopback HTTP server with init images: a.png, b.jpg, c.webp, wide.png, and
    masks: mask.png (256², white square in the middle), mask-small.png (the same at 64²)."""
    folder = tmp_path_factory.mktemp("images")
    make_test_image().save(folder / "a.png")
    make_mask(256).save(folder / "mask.png")
    make_mask(64).save(folder / "mask-small.png")
    make_test_image(seed=3).save(folder / "b.jpg", quality=90)
    make_test_image(seed=5).save(folder / "c.webp")
    make_test_image(384, 256, seed=7).save(folder / "wide.png")
    (folder / "not-an-image.png").write_bytes(b"this is text, not a picture")
    with static_server(folder) as url:
        yield url


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_root):
    """The shared live server (default settings, tiny models)."""
    with live_server(tmp_path_factory.mktemp("server"), tiny_root) as live:
        yield live


@pytest.fixture
def client(server):
    with server.client() as http:
        yield http
