"""``fluxserve generate`` against a live server serving the tiny models: the real console script
in a subprocess (stdout: the saved paths; stderr: the progress), plus the client's pieces
in-process where a subprocess adds nothing (the retry's Idempotency-Key, .base64 outputs, the
rich progress bar)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from fluxserve.cli import app
from fluxserve.client.generate import (
    ClientError,
    GenerateClient,
    GenerateRequest,
    RichProgress,
    choose_route,
    generate,
    sse_events,
)
from tests.conftest import make_mask, make_test_image
from tests.support.process_server import ServerProcess
from tests.support.servers import live_server

FLUXSERVE = str(Path(sys.executable).parent / "fluxserve")


def run_generate(server, *args: str, key: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLUXSERVE_")}
    env.update(FLUXSERVE_URL=server.base_url, FLUXSERVE_KEY=key if key is not None else server.key)
    return subprocess.run([FLUXSERVE, "generate", *args], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


def saved_images(done: subprocess.CompletedProcess) -> list[Path]:
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines() if line.strip()]
    for path in paths:
        assert path.is_file(), path
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), path
    return paths


def job_of(server, path: Path):
    """The server's job behind a saved file (named <request id>-<n>.png)."""
    job_id = int(path.name.split("-")[0])
    return server.jobs.get(job_id)


@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    make_test_image(256, 256, seed=2).save(folder / "init.png")
    make_mask(256).save(folder / "mask.png")
    return folder


def test_text_to_image_saves_every_sample_at_the_asked_size_and_shows_the_steps(server, tmp_path):
    out = tmp_path / "out"
    done = run_generate(server, "a red fox in the snow", "--samples", "2", "--width", "256", "--height", "320",
                        "--steps", "20", "--seed", "7", "-o", str(out))
    paths = saved_images(done)
    assert len(paths) == 2 and all(path.parent == out for path in paths)
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (256, 320)
    job = job_of(server, paths[0])
    assert job.task == "text2img" and job.model == "flux-klein" and job.params["seeds"] == [7, 8]
    # the progress went to stderr, one line per change: the steps of 2 samples x 20
    steps = [int(step) for step in re.findall(r"step (\d+)/40", done.stderr)]
    assert steps and steps == sorted(steps), done.stderr
    assert f"request {job.id}: success" in done.stderr
    assert paths[0].name == f"{job.id}-0.png" and paths[1].name == f"{job.id}-1.png"


def test_image_to_image_sends_a_local_file_and_picks_the_models_path(server, tmp_path, pictures):
    done = run_generate(server, "the same at night", "--init-image", str(pictures / "init.png"), "--model", "realtime",
                        "--strength", "0.6", "--steps", "2", "--width", "256", "--height", "256", "-o", str(tmp_path))
    (path,) = saved_images(done)
    job = job_of(server, path)
    assert (job.task, job.model, job.server) == ("img2img", "realtime", "realtime")
    assert "/api/v1/enterprise/realtime/img2img" in done.stderr
    with Image.open(path) as image:
        assert image.size == (256, 256)


def test_several_init_images_are_references_for_flux_klein(server, tmp_path, pictures, image_host):
    """A file and a URL, in that order: FLUX.2 klein takes up to 4 references."""
    result = CliRunner().invoke(app, ["generate", "both in one scene", "--init-image", str(pictures / "init.png"),
                                      "--init-image", f"{image_host}/b.jpg", "--steps", "2", "--width", "256",
                                      "--height", "256", "-o", str(tmp_path / "out")],
                                env={"FLUXSERVE_URL": server.base_url, "FLUXSERVE_KEY": server.key})
    assert result.exit_code == 0, result.output
    (path,) = [Path(line) for line in result.stdout.split()]
    job = job_of(server, path)
    assert (job.task, job.model) == ("img2img", "flux-klein")
    assert len(job.meta["init_image"]) == 2 and job.meta["init_image"][1] == f"{image_host}/b.jpg"


def test_inpainting_with_a_mask_file_keeps_the_unmasked_pixels(server, tmp_path, pictures):
    done = run_generate(server, "a stone statue", "--init-image", str(pictures / "init.png"), "--mask",
                        str(pictures / "mask.png"), "--model", "flux-fill", "--steps", "2", "--width", "256", "--height", "256",
                        "-o", str(tmp_path))
    (path,) = saved_images(done)
    job = job_of(server, path)
    assert (job.task, job.model) == ("inpaint", "flux-fill")
    with Image.open(path) as result, Image.open(pictures / "init.png") as init:
        assert result.size == init.size == (256, 256)
        corner = (0, 0, 48, 48)  # outside the mask's white square: the init image's own pixels
        assert result.convert("RGB").crop(corner).tobytes() == init.convert("RGB").crop(corner).tobytes()


def test_a_model_alias_goes_through_a_path_that_takes_model_id(server, tmp_path):
    """An alias in any case names the model: FLUX.1 text to image through its own enterprise server."""
    done = run_generate(server, "a lighthouse", "--model", "FLUX-DEV", "--steps", "2", "--width", "256", "--height", "256",
                        "-o", str(tmp_path))
    (path,) = saved_images(done)
    assert job_of(server, path).model == "flux"


def test_a_wrong_key_exits_1_with_the_servers_message(server, tmp_path):
    done = run_generate(server, "a cat", "-o", str(tmp_path), key="fs_not-a-key")
    assert done.returncode == 1
    assert "Invalid API key" in done.stderr and done.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_no_key_and_an_unreachable_server_say_what_to_do(tmp_path):
    runner = CliRunner()
    env = {"FLUXSERVE_URL": "http://127.0.0.1:9", "FLUXSERVE_KEY": ""}
    no_key = runner.invoke(app, ["generate", "a cat", "-o", str(tmp_path)], env=env)
    assert no_key.exit_code == 1 and "FLUXSERVE_KEY" in no_key.stderr
    env["FLUXSERVE_KEY"] = "fs_x"
    down = runner.invoke(app, ["generate", "a cat", "-o", str(tmp_path)], env=env)
    assert down.exit_code == 1 and "can't reach http://127.0.0.1:9" in down.stderr and "fluxserve serve" in down.stderr


def test_a_model_that_cant_do_the_task_is_refused_before_sending(server, tmp_path):
    before = server.job_count()
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "a cat", "--model", "flux-fill", "-o", str(tmp_path)],
                           env={"FLUXSERVE_URL": server.base_url, "FLUXSERVE_KEY": server.key})
    assert result.exit_code == 1
    assert "flux-fill can't do text-to-image" in result.stderr and "flux-klein" in result.stderr
    unknown = runner.invoke(app, ["generate", "a cat", "--model", "sdxl", "-o", str(tmp_path)],
                            env={"FLUXSERVE_URL": server.base_url, "FLUXSERVE_KEY": server.key})
    assert unknown.exit_code == 1 and "unknown model 'sdxl'" in unknown.stderr
    mask_alone = runner.invoke(app, ["generate", "a cat", "--mask", "m.png", "-o", str(tmp_path)],
                               env={"FLUXSERVE_URL": server.base_url, "FLUXSERVE_KEY": server.key})
    assert mask_alone.exit_code == 1 and "--mask needs --init-image" in mask_alone.stderr
    assert server.job_count() == before


def test_a_failed_job_exits_1_with_its_message(tmp_path, tiny_root):
    """A model whose weights folder is missing: the job is accepted, then fails in the worker."""
    missing = tmp_path / "no-such-weights"
    with live_server(tmp_path / "data", tiny_root, model_overrides={"flux": {"source": str(missing)}}) as broken:
        done = run_generate(broken, "a cat", "--model", "flux", "--steps", "2", "-o", str(tmp_path / "out"))
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stdout == ""
        message = done.stderr.strip().splitlines()[-1]
        assert message.startswith("error: request 1 failed: ") and str(missing) in message, done.stderr
        assert broken.jobs.get(1).status == "failed"
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(400)
def test_generate_follows_its_request_across_a_server_restart(tmp_path, tiny_root):
    """SIGTERM while the job generates: the stream's last event is ``shutdown``, the job goes back to
    the queue, the command keeps trying, and once the server is back it follows the job to its images."""
    server = ServerProcess(tmp_path / "data", tiny_root, FLUXSERVE_SHUTDOWN_GRACE_SECONDS="0")
    key = server.create_key()
    server.start()
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLUXSERVE_")}
    env.update(FLUXSERVE_URL=server.base_url, FLUXSERVE_KEY=key)
    client = subprocess.Popen([FLUXSERVE, "generate", "a long one", "--width", "512", "--height", "512", "--steps", "40",
                               "--samples", "2", "-o", str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(client.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(re.search(r"step \d+/80", line) for line in lines):
            assert time.monotonic() < deadline and client.poll() is None, "".join(lines) + server.log()
            time.sleep(0.2)
        status, _ = server.terminate(timeout=60)
        assert status == 0, server.log()
        time.sleep(1.0)  # the command is now retrying against a closed port
        assert client.poll() is None, "".join(lines)
        server.start()
        client.wait(timeout=300)
        stdout = client.stdout.read()  # a few lines: no pipe fills up before the command ends
        reader.join(10)
    finally:
        if client.poll() is None:
            client.kill()
        server.stop()
    text = "".join(lines)
    assert client.returncode == 0, text + server.log()
    assert "The server is restarting" in text, text
    paths = [Path(line) for line in stdout.split()]
    assert len(paths) == 2 and all(path.read_bytes().startswith(b"\x89PNG") for path in paths)


# -- the client's pieces, in-process ----------------------------------------------------------------
class FlakyTransport(httpx.BaseTransport):
    """The real transport, except that the first generation POST fails (a connection error, or it
    reaches the server and the answer is lost: a proxy's 503); records every POST's Idempotency-Key."""

    def __init__(self, failure: str):
        self.inner = httpx.HTTPTransport()
        self.failure = failure
        self.keys: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.keys.append(request.headers["Idempotency-Key"])
            if len(self.keys) == 1:
                if self.failure == "connect":
                    raise httpx.ConnectError("connection reset (injected)", request=request)
                self.inner.handle_request(request).close()  # the server queued it; the client never hears
                return httpx.Response(503, json={"message": "bad gateway (injected)"}, request=request)
        return self.inner.handle_request(request)


@pytest.mark.parametrize("failure", ["connect", "lost answer"])
def test_a_send_retried_after_a_connection_error_reuses_its_idempotency_key(server, tmp_path, failure):
    transport = FlakyTransport(failure)
    before = server.job_count()
    lines: list[str] = []
    from fluxserve.client.generate import PlainProgress

    saved = generate(GenerateRequest("a red fox", steps=2, width=256, height=256), base_url=server.base_url, key=server.key,
                     out_dir=tmp_path, view=PlainProgress(lines.append), transport=transport)
    assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1]
    assert server.job_count() == before + 1 and len(saved) == 1


def test_base64_file_outputs_are_decoded_to_the_same_png(server, tmp_path):
    body = {"key": server.key, "prompt": "a cat", "width": 256, "height": 256, "num_inference_steps": 2, "base64": True}
    answer = httpx.post(f"{server.base_url}/api/v1/enterprise/flux_klein/text2img", json=body, timeout=120).json()
    assert answer["status"] == "success" and answer["output"][0].endswith(".base64")
    png = httpx.get(answer["proxy_links"][0], timeout=30).content
    with GenerateClient(server.base_url, server.key) as client:
        assert client.download(answer["output"][0]) == png
        text = httpx.get(answer["output"][0], timeout=30).text
        assert client.download("data:image/png;base64," + text.split(",")[-1]) == png  # inline, with a data: prefix
        with pytest.raises(ClientError, match="not valid base64"):
            client.download("data:image/png;base64,@@@")


def test_the_rich_progress_bar_shows_the_steps_on_a_terminal(server, tmp_path):
    screen = io.StringIO()
    view = RichProgress(Console(file=screen, force_terminal=True, width=120))
    # a job of a few seconds even on idle cores (20 steps at 256² took 0.2 s: done before its
    # event stream opened, so no step was ever drawn), while rich redraws 10 times a second
    saved = generate(GenerateRequest("a lighthouse", steps=50, width=1024, height=1024), base_url=server.base_url,
                     key=server.key, out_dir=tmp_path, view=view)
    assert len(saved) == 1
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert re.search(r"step \d+/50", text) and "success" in text, text


def test_choose_route_uses_the_catalog(server):
    catalog = httpx.get(f"{server.base_url}/api/fluxserve/catalog", timeout=30).json()
    assert choose_route(catalog, "text2img", None).path == "/api/v1/enterprise/flux_klein/text2img"
    kontext = choose_route(catalog, "img2img", "flux-kontext")
    assert (kontext.path, kontext.model) == ("/api/v1/enterprise/flux_kontext_dev/img2img", "flux-kontext-dev")
    fill = choose_route(catalog, "inpaint", "flux-fill")  # no server of its own: a path taking model_id
    assert fill.takes_model_id and fill.model == "flux-fill" and fill.path.endswith("/inpaint")


def test_sse_events_parse_pings_and_multiline_data():
    lines = [": ping", "event: queued", 'data: {"position": 2}', "", "event: done", "data: {\"a\":", "data: 1}", ""]
    assert list(sse_events(lines)) == [("queued", '{"position": 2}'), ("done", '{"a":\n1}')]
