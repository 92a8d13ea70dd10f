"""The README's curl examples work as pasted: against a live server with the default fetch policy
(loopback refused) and nothing but loopback to reach, the host swapped for the test server's.
Their images are the server's own outputs or data: URIs, so they work on an offline machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
EXAMPLE_BASE = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory, tiny_root):
    """A server as `make serve MODELS=tiny` runs it: the default fetch policy (no allowlist)."""
    from tests.support.servers import live_server

    with live_server(tmp_path_factory.mktemp("readme"), tiny_root, fetch_allow=[]) as live:
        yield live


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def curl_blocks() -> list[str]:
    """The runnable examples (a block starting "# needs your bucket" needs real S3 details; its
    path is covered by tests/api/test_s3_delivery.py; the block setting IMAGE and MASK has its own
    test; one for the worker role's port is run by tests/test_roles.py against a real ``fluxserve worker``)."""
    return [block for block in bash_blocks()
            if "curl " in block and not block.startswith(("# needs your", WORKER_BLOCK)) and "IMAGE=$(" not in block]


WORKER_BLOCK = "# needs a running `fluxserve worker`"  # run against a real worker role by tests/test_roles.py


def worker_blocks() -> list[str]:
    return [block for block in bash_blocks() if block.startswith(WORKER_BLOCK)]


def image_setup_block() -> str:
    """The block that sets IMAGE (an output of the server) and MASK (a data: URI)."""
    return next(block for block in bash_blocks() if "IMAGE=$(" in block)


def with_setup(script: str) -> str:
    """A block as pasted into the shell where the earlier blocks it relies on ran."""
    if ("$IMAGE" in script or "$MASK" in script) and "IMAGE=$(" not in script:
        script = image_setup_block() + "\n" + script
    return script


def test_the_examples_reach_no_host_but_the_server_itself():
    """An offline box has nothing else: every URL in the runnable examples is the server's (or a
    data: URI), none a picture on GitHub or a CDN."""
    for block in bash_blocks():
        if block.startswith("# needs your"):  # the S3 example's placeholders
            continue
        base = "http://127.0.0.1:9100" if block.startswith(WORKER_BLOCK) else EXAMPLE_BASE  # the worker role's port
        for url in re.findall(r"https?://[^\s\"'\\)]+", block):
            assert url == base or url.startswith(base + "/"), (url, block)
    setup = image_setup_block()
    assert re.search(r"MASK='data:image/png;base64,[A-Za-z0-9+/=]+'", setup), setup
    assert "$IMAGE" in "\n".join(curl_blocks()) and "$MASK" in "\n".join(curl_blocks())
    assert "githubusercontent" not in README.read_text()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_image_setup_block_makes_an_image_the_server_serves_and_a_mask(readme_server, tmp_path):
    from fluxserve.fetching import decode_data_uri
    from fluxserve.images import decode_image

    script = image_setup_block().replace(EXAMPLE_BASE, readme_server.base_url) + '\nprintf "%s\\n%s\\n" "$IMAGE" "$MASK"'
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, KEY=readme_server.key), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    image, mask = done.stdout.splitlines()
    assert image.startswith(readme_server.base_url + "/outputs/") and image.endswith(".png"), image
    mask_image = decode_image(decode_data_uri(mask, 10_000))
    assert mask_image.getpixel((0, 0)) == (0, 0, 0) and mask_image.getpixel((4, 4)) == (255, 255, 255)


def json_objects(text: str) -> list[dict]:
    decoder, objects, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        obj, index = decoder.raw_decode(text, index)
        objects.append(obj)
    return objects


def test_readme_has_a_curl_for_every_endpoint():
    text = "\n".join(curl_blocks())
    for path in ("flux_klein/text2img", "flux_klein/img2img", "realtime/text2img", "realtime/img2img",
                 "realtime/inpaint", "v6/images/text2img", "flux/img2img", "v6/images/inpaint", "v6/images/img2img",
                 "flux_klein/fetch/", "realtime/fetch/", "flux/fetch/", "images/fetch/", "v6/images/fetch/",
                 "v6/images/fetch -d", "enterprise/fetch -d", "v6/realtime/fetch/", "v6/fetch/", "image_editing/fetch/",
                 "fluxserve/webhooks/deliveries?", "fluxserve/webhooks/deliveries/$DELIVERY_ID/replay",
                 "fluxserve/webhooks/replay", "/v1/images/generations", "/v1/images/edits", "/v1/models"):
        assert path in text, path


def test_readme_lists_every_path_family_of_the_table():
    """The README's path table names every prefix and action of api/paths.py."""
    from fluxserve.api.paths import PATH_FAMILIES

    text = README.read_text()
    for family in PATH_FAMILIES:
        assert f"`{family.prefix}`" in text, family.prefix
        for action in family.actions:
            assert f"`{action.name}`" in text, (family.prefix, action.name)


def _seed_dead_letter(server) -> int:
    """A finished job whose webhook gave up (as after a day of a receiver being down), for the
    dead-letter examples; replayed, it is sent to a closed loopback port and retried."""
    from fluxserve.jobs.tables import Job, WebhookDelivery, utcnow

    key = server.keys.authenticate(server.key)
    now = utcnow()
    with server.jobs._sessions.begin() as session:
        job = Job(key_id=key.id, server="v6", model="flux", task="text2img", status="failed", params={"seeds": [1]},
                  meta={}, file_prefix="dead-letter", outputs=[], error="example", webhook="http://127.0.0.1:9/hook")
        session.add(job)
        session.flush()
        delivery = WebhookDelivery(job_id=job.id, key_id=key.id, url=job.webhook, receiver="http://127.0.0.1:9",
                                   payload={"status": "failed", "id": job.id}, status="dead", attempts=12,
                                   next_attempt_at=now, give_up_at=now, gave_up_at=now, last_error="HTTP 503")
        session.add(delivery)
        session.flush()
        return delivery.id


def _answers(stdout: str) -> list[dict]:
    """JSON answers, including the data lines of an event stream."""
    if "event:" in stdout:
        return [json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("data:")]
    return json_objects(stdout)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("index", range(len(curl_blocks())))
def test_readme_curl_block_works(readme_server, index, tmp_path):
    server = readme_server
    blocks = curl_blocks()
    script = blocks[index]
    if "$ID" in script and "ID=$(" not in script:  # later blocks use the ID set by an earlier one
        script = next(block for block in blocks if "ID=$(" in block) + "\n" + script
    script = with_setup(script).replace(EXAMPLE_BASE, server.base_url)
    script = script.replace(".venv/bin/python", sys.executable)
    script = "\n".join(line for line in script.splitlines() if not line.startswith("export ADMIN_KEY="))
    if "$DELIVERY_ID" in script:  # the dead-letter examples replay one: there is one
        _seed_dead_letter(server)
    env = dict(os.environ, KEY=server.key, ADMIN_KEY=server.admin_key)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)  # files a block writes (an image to upload) land there
    assert done.returncode == 0, done.stderr
    answers = _answers(done.stdout)
    assert answers, done.stdout
    for answer in answers:
        if "data" in answer:  # the OpenAI API: images or the model list
            assert answer["data"] and ("created" in answer or answer.get("object") == "list"), answer
            continue
        if answer.get("status") == "error":  # only the cancel example may refuse: its job is done by then
            assert "only queued requests can be cancelled" in answer["message"], answer
            continue
        assert answer.get("status") in ("success", "processing", "ok") or "step" in answer or "position" in answer, answer
        if answer.get("status") in ("success", "processing") and "replayed" not in answer:  # replay all: ids listed
            assert isinstance(answer["id"], int)


def test_readme_webhook_verification_snippet_accepts_our_signatures():
    from fluxserve.webhooks import sign

    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "verify_fluxserve" in b)
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102 - our own README
    verify = namespace["verify_fluxserve"]
    body, secret = b'{"id":1,"status":"success"}', "whsec_test"
    timestamp = str(int(time.time()))
    headers = {"X-Fluxserve-Timestamp": timestamp, "X-Fluxserve-Signature": "sha256=" + sign(secret, int(timestamp), body)}
    assert verify(secret, headers, body)
    assert not verify("whsec_other", headers, body)
    assert not verify(secret, headers, body + b" ")


def test_readme_modelslab_cli_block_works(readme_server, tmp_path):
    server = readme_server
    block = next(b for b in bash_blocks() if "modelslab --base-url" in b)
    script = with_setup(block).replace(EXAMPLE_BASE, server.base_url)
    script = script.replace(".venv/bin/modelslab", str(Path(sys.executable).parent / "modelslab"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSLAB_")}
    env.update(KEY=server.key, HOME=str(tmp_path))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((tmp_path / "generated").glob("*.png"))) == 2  # one image per command, downloaded


def test_readme_fluxserve_generate_block_works(server, tmp_path):
    """The `fluxserve generate` examples as pasted: text to image, image to image from the saved
    file, inpainting it with a data: URI mask, against the server named by FLUXSERVE_URL."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S) if "fluxserve generate" in b)
    script = block.replace(".venv/bin/fluxserve", str(Path(sys.executable).parent / "fluxserve"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXSERVE_")}
    env.update(KEY=server.key, FLUXSERVE_URL=server.base_url)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = set((tmp_path / "out").glob("*.png"))
    printed = {tmp_path / line for line in done.stdout.split()}  # the first command's path went into $FOX
    assert len(saved) == 4 and len(printed) == 3 and printed < saved, (saved, done.stdout)


def test_the_configuration_table_has_a_row_for_every_setting():
    """A row names a variable in full, or as `_SUFFIX` after a sibling (`FLUXSERVE_WEBHOOK_RETRY_SECONDS` /
    `_TIMEOUT_SECONDS`)."""
    from fluxserve.config import Settings, env_name

    section = README.read_text().split("## Configuration", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `FLUXSERVE_")]
    def named(name: str, row: str) -> bool:
        if f"`{name}`" in row:
            return True
        full_names = re.findall(r"`(FLUXSERVE_[A-Z0-9_]+)`", row)
        stems = {full[:i + 1] for full in full_names for i, char in enumerate(full) if char == "_"}
        return any(name.startswith(stem) and f"`_{name[len(stem):]}`" in row for stem in stems)

    for field in Settings.model_fields:
        assert any(named(env_name(field), row) for row in rows), env_name(field)
