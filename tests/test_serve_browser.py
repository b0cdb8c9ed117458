"""The web chat in headless Chromium (Debian's `chromium`, driven by Playwright): the page loads from the
server alone, asks for the API key, streams a reply with its reasoning in a collapsible block, shows
tokens/s and cost, and keeps the conversation across a reload (localStorage)."""

from __future__ import annotations

import os
import shutil

import pytest

from hemat.serve.app import ServeSettings
from test_serve import ANSWER, API_KEY, MODEL_NAME, REASONING, LiveServer, scripted_checkpoint  # noqa: F401 (fixture)

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def live(scripted_checkpoint):
    settings = ServeSettings(served_model_name=MODEL_NAME, api_key=API_KEY, price_input=1.0, price_output=4.0)
    with LiveServer(scripted_checkpoint, settings) as server:
        yield server


@pytest.fixture(scope="module")
def page():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1200, "height": 760})
        outside = []  # every request that leaves the server: the page must need nothing else
        local = ("http://127.0.0.1", "data:")
        context.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
        page = context.new_page()
        page.outside_requests = outside
        yield page
        browser.close()


def test_chat_page_streams_reply_with_reasoning(live, page, tmp_path):
    page.goto(live.url + "/")
    # the server has a key: the page says so and offers the key field
    sync_api.expect(page.locator("#status")).to_contain_text("API key")
    page.fill("#api-key", API_KEY)
    page.locator("#api-key").dispatch_event("change")
    sync_api.expect(page.locator("#model-info")).to_contain_text(MODEL_NAME)

    page.fill("#prompt", "Hello, who are you?")
    page.keyboard.press("Enter")
    reply = page.locator(".message.assistant").last
    sync_api.expect(reply.locator(".bubble")).to_have_text(ANSWER)
    sync_api.expect(reply).to_have_class("message assistant done")
    reasoning = reply.locator("details.reasoning")
    sync_api.expect(reasoning).to_be_visible()
    sync_api.expect(reasoning.locator(".reasoning-text")).to_have_text(REASONING)
    assert reasoning.get_attribute("open") is None  # collapsed once the answer started
    reasoning.locator("summary").click()
    sync_api.expect(reasoning.locator(".reasoning-text")).to_be_visible()
    stats = reply.locator(".stats")
    sync_api.expect(stats).to_contain_text("tokens")
    assert "tok/s" in stats.inner_text() and "$" in stats.inner_text()
    sync_api.expect(page.locator(".message.user .bubble")).to_have_text("Hello, who are you?")

    screenshot = tmp_path / "chat.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("HEMAT_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["HEMAT_SCREENSHOT"])

    # conversations and the key survive a reload
    page.reload()
    sync_api.expect(page.locator(".conversation")).to_have_count(1)
    sync_api.expect(page.locator(".message.assistant .bubble")).to_have_text(ANSWER)
    sync_api.expect(page.locator("#model-info")).to_contain_text(MODEL_NAME)
    assert page.outside_requests == []
