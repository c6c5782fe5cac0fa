"""web.py's chat page in headless Chromium (Debian's, driven by Playwright): log in, ask, see the answer, clear."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.test_web import KEY, QUESTION, http, serve_web

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is absent; install Debian's chromium to run the browser test")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency (requirements-dev.txt)")


@pytest.fixture(scope="module")
def ui_url(trained_adapter: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """web.py with its chat page behind the API key; 24 new tokens by default."""
    log = str(tmp_path_factory.mktemp("web_ui") / "web.log")
    with serve_web(trained_adapter, log, "--api_key", KEY, "--max_new_tokens", "24") as url:
        yield url


def test_chat_page_answers_like_the_api(ui_url: str) -> None:
    status, body = http("GET", f"{ui_url}/ui/config")
    assert status == 401, body  # the page's own API is behind the login too
    status, body = http("POST", f"{ui_url}/v1/chat/completions", key=KEY, body={
        "model": "run", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0})
    assert status == 200, body
    api_answer = body["choices"][0]["message"]["content"]

    expect = sync_api.expect
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{ui_url}/")  # redirects to /ui/, which asks for the key
            page.locator("input[type=text]").fill("tester")
            page.locator("input[type=password]").fill(KEY)
            page.get_by_role("button", name="Login").click()

            page.get_by_label("number input for temperature (0 = greedy)").fill("0")  # greedy, like the API call
            page.get_by_label("number input for temperature (0 = greedy)").press("Enter")
            box = page.get_by_role("textbox")
            box.fill(QUESTION)
            box.press("Enter")

            expect(page.get_by_test_id("user")).to_have_text(QUESTION, timeout=60_000)
            bot = page.get_by_test_id("bot")
            expect(bot).to_have_count(1, timeout=60_000)
            expect(page.get_by_test_id("stop-button")).to_be_hidden(timeout=60_000)  # streaming has ended
            assert " ".join(bot.inner_text().split()) == " ".join(api_answer.split())

            page.get_by_role("button", name="Clear").click()
            expect(page.get_by_test_id("bot")).to_have_count(0)
            expect(page.get_by_test_id("user")).to_have_count(0)
        finally:
            browser.close()
