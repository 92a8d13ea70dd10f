"""Fixtures of the browser tests: one headless Chromium per module, a live server with the tiny
models, and pages whose every request to anything but loopback is aborted and recorded (each test
ends by asserting there was none)."""

from __future__ import annotations

import pytest

from tests.support.browser import CHROMIUM_ARGS, REQUIRE_ENV, browser_required, find_chromium, is_loopback
from tests.support.servers import live_server


def _unavailable(reason: str) -> None:
    if browser_required():
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        _unavailable("no chromium binary (apt-get install chromium; or set FLUXSERVE_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def web(tmp_path_factory, tiny_root):
    """The server the pages talk to (its own: the operator test clears its queue)."""
    with live_server(tmp_path_factory.mktemp("browser-server"), tiny_root, lora_hub_ids=["fluxserve-test/not-cached"],
                     max_queued_per_key=20) as live:
        yield live


class Pages:
    """New pages in one browser context, with the network fenced to loopback."""

    def __init__(self, browser, **context_options):
        self.context = browser.new_context(**context_options)
        self.outside: list[str] = []  # requests to anything but loopback (aborted)
        self.errors: list[str] = []  # uncaught script errors
        self.context.route("**/*", self._fence)

    def _fence(self, route) -> None:
        if is_loopback(route.request.url):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort("blockedbyclient")

    def new(self):
        page = self.context.new_page()
        page.set_default_timeout(60_000)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        return page


@pytest.fixture
def pages(browser):
    """Pages at a modest desktop size; fails the test if a page asked for anything off loopback."""
    fenced = Pages(browser, viewport={"width": 1180, "height": 860}, device_scale_factor=1)
    fenced.context.grant_permissions(["clipboard-read", "clipboard-write"])
    yield fenced
    fenced.context.close()
    assert fenced.outside == [], f"requests off loopback: {fenced.outside}"
    assert fenced.errors == [], f"script errors: {fenced.errors}"


@pytest.fixture
def phone(browser):
    """A phone-sized page (390x844, touch)."""
    fenced = Pages(browser, viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True, has_touch=True)
    yield fenced
    fenced.context.close()
    assert fenced.outside == [], f"requests off loopback: {fenced.outside}"
    assert fenced.errors == [], f"script errors: {fenced.errors}"
