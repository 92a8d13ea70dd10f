"""The README's curl examples work as pasted (against a live server, with the init image URL
pointed at loopback and the host swapped for the test server's)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
EXAMPLE_IMAGE = "https://raw.githubusercontent.com/CompVis/stable-diffusion/main/data/inpainting_examples/overture-creations-5sI6fQgYIuo.png"


def curl_blocks() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return [block for block in blocks if "curl " in block]


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
                 "flux/img2img", "v6/images/img2img", "flux_klein/fetch/", "realtime/fetch/", "flux/fetch/",
                 "v6/images/fetch/", "v6/images/fetch -d", "v6/realtime/fetch/"):
        assert path in text, path


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("index", range(len(curl_blocks())))
def test_readme_curl_block_works(server, image_host, index):
    script = curl_blocks()[index].replace("http://127.0.0.1:8000", server.base_url).replace(EXAMPLE_IMAGE, f"{image_host}/a.png")
    if "$ID" in script and "ID=$(" not in script:  # the "other fetch routes" block follows the one that sets ID
        script = curl_blocks()[index - 1].replace("http://127.0.0.1:8000", server.base_url) + "\n" + script
    env = dict(os.environ, KEY=server.key)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = json_objects(done.stdout)
    assert answers, done.stdout
    for answer in answers:
        assert answer["status"] in ("success", "processing"), answer
        assert isinstance(answer["id"], int)
