"""The playground, the operator view and the docs in a real headless Chromium (Debian's, driven by
Playwright), against a live server with the tiny models, the network fenced to loopback: every
test fails if a page asked for anything else. Each writes a screenshot to docs/screenshots/ (the
README shows them)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import make_test_image
from tests.support.waiting import wait_until

SCREENSHOTS = Path(__file__).parents[2] / "docs" / "screenshots"
KLEIN = "/api/v1/enterprise/flux_klein/text2img"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
LONG = 180_000  # ms: a generation on a busy 2-core machine


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=30_000)  # a busy 2-core machine renders slowly
    return playwright_expect(locator)


def shot(page, name: str, full_page: bool = True, max_height: int = 1600) -> None:
    """A PNG under docs/screenshots, kept small: at most ``max_height`` pixels of the page, in 256 colours."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate("document.documentElement.scrollHeight") if full_page else page.viewport_size["height"]
    clip = {"x": 0, "y": 0, "width": page.viewport_size["width"], "height": min(height, max_height)}
    picture = Image.open(BytesIO(page.screenshot(full_page=full_page, clip=clip)))
    picture.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(SCREENSHOTS / name, optimize=True)


def save_key(page, key: str) -> None:
    page.fill("#key", key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-state")).to_contain_text("saved in this browser")


def open_playground(pages, web, key: str | None = None):
    page = pages.new()
    page.goto(f"{web.base_url}/")
    save_key(page, key or web.key)
    expect(page.locator("#model option").first).to_be_attached()  # the catalog arrived
    return page


def choose(page, task: str, model: str) -> None:
    page.select_option("#task", task)
    page.select_option("#model", model)


def generation_response(page):
    """Expect the playground's POST to a generation path."""
    return page.expect_response(lambda r: r.request.method == "POST" and "/api/v" in r.url, timeout=LONG)


def slow_job(web, key: str, **extra) -> dict:
    """A job that keeps the worker busy for a while (queued behind it: the rest)."""
    with web.client() as http:
        return http.post(KLEIN, json={"key": key, "prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 12,
                                      "safety_checker": False, "instant_response": True, **extra}).json()


def test_generate_watch_progress_reuse_a_seed_and_copy_the_request(pages, web):
    page = open_playground(pages, web)
    choose(page, "text2img", "flux-klein")
    assert page.input_value("#endpoint") == "/api/v1/enterprise/flux_klein/text2img"  # the model's own path first
    page.fill("#prompt", "a lighthouse in a storm")
    for field, value in (("#width", "256"), ("#height", "256"), ("#steps", "8"), ("#samples", "2"), ("#seed", "42")):
        page.fill(field, value)
    ahead = slow_job(web, web.other_key, width=512, height=512)  # so the page shows a queue position
    with generation_response(page) as sent:
        page.click("#generate")
    request = sent.value.request
    assert UUID.match(request.headers["idempotency-key"]), request.headers  # one per click
    assert request.headers["key"] == web.key and request.post_data_json["instant_response"] is True
    job = sent.value.json()
    assert job["status"] == "processing"

    expect(page.locator("#gallery figure")).to_have_count(2, timeout=LONG)
    events = page.locator("#events li").evaluate_all("items => items.map(item => item.dataset.event)")
    assert events[-1] == "done" and "progress" in events, events
    assert "queued" in events or web.jobs.get(ahead["id"]).finished_at < web.jobs.get(job["id"]).created_at, events
    assert page.locator("#gallery .seed").all_inner_texts() == ["seed 42", "seed 43"]
    assert page.locator("#gallery img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)") == [256, 256]
    expect(page.locator("#status")).to_contain_text(f"Request {job['id']}: 2 image(s)")
    meta = page.text_content("#meta")
    assert '"seeds": [\n    42,\n    43\n  ]' in meta and '"model_id": "flux-klein"' in meta

    # one click puts an image's seed into the form, and the copies follow the form
    page.locator("#gallery figure").nth(1).locator("button.use-seed").click()
    expect(page.locator("#seed")).to_have_value("43")
    expect(page.locator("#code-curl")).to_contain_text('"seed":43')
    shot(page, "playground.png")

    curl = page.text_content("#code-curl")
    page.click("#copy-curl")
    assert page.evaluate("navigator.clipboard.readText()") == curl
    ran = subprocess.run(["bash", "-c", curl], env={**os.environ, "KEY": web.key}, capture_output=True, text=True,
                         timeout=300, check=True)
    answer = json.loads(ran.stdout)
    assert answer["status"] == "success" and answer["meta"]["seeds"] == [43, 44], answer
    assert answer["meta"]["num_inference_steps"] == 8 and answer["meta"]["prompt"] == "a lighthouse in a storm"

    python = page.text_content("#code-python")
    page.click("#copy-python")
    assert page.evaluate("navigator.clipboard.readText()") == python
    assert "from modelslab_py.core.client import Client" in python
    ran = subprocess.run([sys.executable, "-c", python], env={**os.environ, "KEY": web.key}, capture_output=True, text=True,
                         timeout=300, check=True)
    assert ran.stdout.startswith("success ['http://127.0.0.1:"), ran.stdout

    # the history shows the key's requests, newest first, with their images
    page.click("#history-refresh")
    newest = page.locator("#history li").first
    expect(newest).to_have_attribute("data-id", str(job["id"] + 2))  # the curl's, then the Python's, are newer
    expect(page.locator(f"#history li[data-id='{job['id']}'] .thumbs img")).to_have_count(2)


def test_draw_a_mask_on_the_image_and_inpaint(pages, web, image_host):
    page = open_playground(pages, web)
    choose(page, "inpaint", "flux-klein")
    page.fill("#prompt", "a red bench")
    for field, value in (("#width", "256"), ("#height", "256"), ("#steps", "4"), ("#seed", "7")):
        page.fill(field, value)
    page.fill("#init-url", f"{image_host}/a.png")
    page.locator("#init-url").dispatch_event("change")
    expect(page.locator("#mask-canvas")).to_have_attribute("width", "256")  # the image's own size
    box = page.locator("#mask-canvas").bounding_box()

    def at(x: float, y: float) -> tuple[float, float]:
        return box["x"] + box["width"] * x, box["y"] + box["height"] * y

    page.mouse.move(*at(0.3, 0.3))
    page.mouse.down()
    page.mouse.move(*at(0.7, 0.7), steps=12)
    page.mouse.move(*at(0.3, 0.7), steps=8)
    page.mouse.up()
    with generation_response(page) as sent:
        page.click("#generate")
    body = sent.value.request.post_data_json
    assert sent.value.request.url.endswith("/api/v1/enterprise/flux_klein/inpaint")
    assert body["init_image"] == f"{image_host}/a.png" and body["mask_image"].startswith("data:image/png;base64,")
    mask = Image.open(BytesIO(base64.b64decode(body["mask_image"].split(",", 1)[1]))).convert("L")
    assert mask.size == (256, 256)
    assert mask.getpixel((128, 128)) == 255 and mask.getpixel((100, 179)) == 255  # painted: repaint
    assert mask.getpixel((10, 10)) == 0 and mask.getpixel((240, 20)) == 0  # the rest: keep
    expect(page.locator("#gallery figure")).to_have_count(1, timeout=LONG)
    expect(page.locator("#gallery .seed")).to_have_text("seed 7")
    expect(page.locator("#meta")).to_contain_text('"mask_image": "data:image/png;base64')
    shot(page, "inpaint.png")


def test_kontext_with_an_uploaded_image_and_a_second_one_by_url(pages, web, image_host, tmp_path):
    upload = tmp_path / "upload.png"
    make_test_image(seed=9).save(upload)
    page = open_playground(pages, web)
    choose(page, "img2img", "flux-kontext-dev")
    expect(page.locator("#second")).to_be_visible()  # the model takes init_image_2 (from the catalog)
    page.fill("#prompt", "make it a watercolour")
    page.fill("#steps", "2")
    page.set_input_files("#init-file", str(upload))
    expect(page.locator("#init-preview")).to_be_visible()
    page.fill("#second-url", f"{image_host}/b.jpg")
    page.locator("#second-url").dispatch_event("change")
    with generation_response(page) as sent:
        page.click("#generate")
    body = sent.value.request.post_data_json
    assert sent.value.request.url.endswith("/api/v1/enterprise/flux_kontext_dev/img2img")
    assert body["init_image"].startswith("data:image/png;base64,") and body["init_image_2"] == f"{image_host}/b.jpg"
    expect(page.locator("#gallery figure")).to_have_count(1, timeout=LONG)
    expect(page.locator("#meta")).to_contain_text(f'"init_image_2": "{image_host}/b.jpg"')
    assert "shortened on screen" in page.text_content("#code-curl")  # the upload, not pasted whole on screen


def test_the_playground_fits_a_phone(phone, web):
    page = open_playground(phone, web)
    choose(page, "text2img", "realtime")
    page.fill("#prompt", "a red fox")
    for field, value in (("#width", "256"), ("#height", "256"), ("#seed", "5")):
        page.fill(field, value)
    page.tap("#generate")
    expect(page.locator("#gallery figure")).to_have_count(1, timeout=LONG)
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0  # no sideways scrolling
    form, result = page.locator("#gen").bounding_box(), page.locator("#result").bounding_box()
    assert result["y"] >= form["y"] + form["height"] - 1 and form["width"] <= 390  # one column
    shot(page, "playground-phone.png")


def test_the_operator_view_needs_an_admin_key_and_shows_and_acts_on_the_service(pages, web):
    with web.client() as http:
        failed = http.post(KLEIN, json={"key": web.key, "prompt": "x", "width": 256, "height": 256,
                                        "lora_model": "fluxserve-test/not-cached"}).json()
        assert failed["status"] == "failed"
        running = slow_job(web, web.other_key)
        wait_until(lambda: web.jobs.get(running["id"]).status == "running", 60, "the slow job to run")
        queued = [http.post(KLEIN, json={"key": web.key, "prompt": f"queued {i}", "width": 256, "height": 256,
                                         "instant_response": True}).json() for i in range(2)]
    page = pages.new()
    page.on("dialog", lambda dialog: dialog.accept())  # clear_queue asks first
    page.goto(f"{web.base_url}/operator")
    save_key(page, web.key)  # a user key: every call answers 403
    expect(page.locator("#refused")).to_contain_text("403")
    save_key(page, web.admin_key)
    expect(page.locator("#refused")).to_be_hidden()
    expect(page.locator(f"#queue tr[data-id='{running['id']}']")).to_contain_text("running")
    expect(page.locator(f"#queue tr[data-id='{queued[0]['id']}']")).to_contain_text("queued")
    expect(page.locator(f"#failures tr[data-id='{failed['id']}'] td.message")).to_contain_text("fluxserve-test/not-cached")
    expect(page.locator("#worker")).to_contain_text("alive")
    expect(page.locator("#device")).to_contain_text("cpu")
    expect(page.locator("#queue-depth")).to_have_text(re.compile(r"^[1-9]\d*$"))
    expect(page.locator("#dead-letters")).to_have_text(re.compile(r"^\d+$"))
    shot(page, "operator.png")

    page.click(f"[data-cancel='{queued[0]['id']}']")
    expect(page.locator("#cancel-result")).to_have_text(f"Request {queued[0]['id']} cancelled.")
    assert web.jobs.get(queued[0]["id"]).status == "cancelled"
    page.click("#clear-queue")
    expect(page.locator("#cancel-result")).to_contain_text("queued requests cancelled")
    wait_until(lambda: web.jobs.get(queued[1]["id"]).status == "cancelled", 10, "clear_queue")
    assert web.jobs.get(running["id"]).status in ("running", "succeeded")  # running jobs finish


def test_the_docs_load_with_the_network_fenced_to_loopback(pages, web):
    page = pages.new()
    page.goto(f"{web.base_url}/docs")
    expect(page.locator(".opblock").first).to_be_visible()
    assert page.locator(".opblock").count() >= 40
    page.locator(".opblock-summary-path[data-path='/api/v1/enterprise/flux_klein/text2img']").click()
    operation = page.locator(".opblock.is-open")
    expect(operation).to_contain_text("your_api_key")  # the example body
    expect(operation).to_contain_text("ultra realistic close up portrait")
    expect(operation.locator(".responses-table .response-col_status").first).to_be_visible()
    shot(page, "docs.png", full_page=False)
    page.goto(f"{web.base_url}/redoc")
    expect(page.locator("h1").first).to_contain_text("fluxserve")
    assert pages.outside == []


@pytest.fixture(autouse=True, scope="module")
def _idle_worker_at_the_end(web):
    """Leave no slow job running when the module's server stops."""
    yield
    wait_until(lambda: web.jobs.queue_depth() == 0 and web.jobs.running_count() == 0, 300, "the worker to go idle", 0.5)
