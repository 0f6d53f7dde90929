"""The web chat page: served with its controls and nothing from elsewhere, and driven in a real headless Chromium
(single model, side by side, sampling controls). Screenshots of each view go to ``$ROAD_VLM_SCREENSHOTS`` (default:
the test's tmp dir); they are not committed."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from road_vlm.serve.server import create_app

LOCAL = "http://127.0.0.1"  # the Host the server accepts (it refuses others: DNS rebinding)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key
# A 1x1 PNG, for the drop and paste events.
_TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def test_page_assets_and_demo_image_are_served_from_this_origin_only(engine):
    with TestClient(create_app(engine, web_ui=True), base_url=LOCAL) as client:
        page = client.get("/")
        assets = {name: client.get(f"/static/{name}") for name in ("chat.css", "chat.js")}
        missing = client.get("/static/../server.py")
        unknown = client.get("/static/secret.txt")
        demo = client.get("/demo.png")
        api_only = TestClient(create_app(engine), base_url=LOCAL).get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element_id in ("model-list", "image-input", "demo-image", "remove-image", "drop", "preview", "temperature",
                       "top-p", "max-tokens", "stop", "examples", "columns", "question", "send", "regenerate",
                       "reset", "error", "status"):
        assert f'id="{element_id}"' in page.text, element_id
    assert assets["chat.css"].headers["content-type"].startswith("text/css")
    assert assets["chat.js"].headers["content-type"].startswith("text/javascript")
    # Nothing is loaded from another origin, and the browser is told so.
    for text in [page.text, *(a.text for a in assets.values())]:
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text) and "@import" not in text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert missing.status_code == 404 and unknown.status_code == 404
    assert demo.status_code == 200 and demo.content.startswith(b"\x89PNG")
    assert api_only.status_code == 404  # the page is only there when asked for


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def live_server(engine, run_server) -> Iterator[str]:
    """The chat-ui app on a real uvicorn server, on a free loopback port."""
    with run_server(create_app(engine, web_ui=True, default_max_tokens=8)) as url:
        yield url


class WebDriver:
    """The few W3C WebDriver calls the test needs, spoken to chromedriver over HTTP."""

    def __init__(self, url: str, user_data_dir: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}"]
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        response = self.http.request(method, path, json=body)
        value = response.json()["value"]
        if response.status_code != 200:
            raise RuntimeError(f"webdriver {method} {path}: {value}")
        return value

    def cmd(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def keys(self, text: str) -> None:
        """Type into whatever has the focus (keyboard-only use)."""
        self.cmd("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": [
            action for ch in text for action in ({"type": "keyDown", "value": ch}, {"type": "keyUp", "value": ch})]}]})

    def screenshot(self, name: str) -> Path:
        folder = Path(os.environ.get("ROAD_VLM_SCREENSHOTS") or self.screenshots)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))
        return path

    def window(self, width: int, height: int) -> None:
        self.cmd("POST", "/window/rect", {"width": width, "height": height})

    def js(self, script: str) -> Any:
        return self.cmd("POST", "/execute/sync", {"script": script, "args": []})

    def wait_for(self, script: str, what: str, timeout: float = 90) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(script)
            if value:
                return value
            time.sleep(0.1)
        page_error = self.js("return document.getElementById('error').textContent")
        raise AssertionError(f"timed out waiting for {what}; page error: {page_error!r}")

    def quit(self) -> None:
        try:
            self.cmd("DELETE", "")
        finally:
            self.http.close()


@pytest.fixture()
def browser(tmp_path) -> Iterator[WebDriver]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")
    port = _free_port()
    log = (tmp_path / "chromedriver.log").open("w")
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/status", timeout=2).json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or driver.poll() is not None:
                pytest.fail(f"chromedriver did not start: {(tmp_path / 'chromedriver.log').read_text()}")
            time.sleep(0.1)
        web = WebDriver(url, str(tmp_path / "chrome-profile"))
        web.screenshots = tmp_path / "screenshots"
        web.window(1280, 900)
        try:
            yield web
        finally:
            web.quit()
    finally:
        driver.terminate()
        driver.wait(30)
        log.close()


def _tick(browser: WebDriver, models: list[str]) -> None:
    """Tick exactly ``models`` in the model list (by clicking, as a user would)."""
    for model in browser.js("return Array.from(document.querySelectorAll('#model-list input')).map(b => b.value)"):
        checked = browser.js(f"return document.querySelector('#model-list input[value=\"{model}\"]').checked")
        if checked != (model in models):
            browser.click(f'#model-list input[value="{model}"]')


def _answers(browser: WebDriver, n: int) -> dict[str, str]:
    """{model: its column's last answer} once ``n`` columns have a finished answer."""
    return browser.wait_for(
        "const cols = Array.from(document.querySelectorAll('.column'));"
        f"if (cols.length !== {n} || !cols.every(c => c.querySelector('.msg.assistant[data-done]'))) return null;"
        "const out = {}; for (const c of cols) { const a = c.querySelectorAll('.msg.assistant');"
        "out[c.dataset.model] = a[a.length - 1].textContent; } return out;", f"{n} answers")


def _api_answer(url: str, model: str, question: str, image_url: str | None = None, **extra: Any) -> dict:
    content: list[dict] = [{"type": "text", "text": question}]
    if image_url:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": content}], **extra}).json()


@pytest.mark.slow
def test_web_chat_uploads_an_image_and_streams_the_answer_in_headless_chromium(live_server, browser, image_path):
    browser.cmd("POST", "/url", {"url": live_server + "/"})
    browser.wait_for("return document.getElementById('status').textContent === 'idle'", "the model list")
    options = browser.js("return Array.from(document.querySelectorAll('#model-list input')).map(b => b.value)")
    assert options == ["base", "road4", "road1proj", "lora"]
    labels = browser.js("return Array.from(document.querySelectorAll('#model-list label')).map(l => l.textContent)")
    assert labels == ["base (base, no adapter)", "road4", "road1proj", "lora"]
    _tick(browser, ["road1proj"])

    browser.type("#image-input", str(image_path))  # a real file upload through the file input
    browser.wait_for("return document.getElementById('preview').src.startsWith('data:image/png')", "the preview")
    browser.type("#question", "What is in the image?")
    browser.click("#send")
    answer = _answers(browser, 1)["road1proj"]

    # The page's answer is the API's answer for the same adapter and image.
    data_url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    expected = _api_answer(live_server, "road1proj", "What is in the image?", data_url)
    assert answer == expected["choices"][0]["message"]["content"] and answer
    assert browser.js("return document.getElementById('error').textContent") == ""
    meta = browser.js("return document.querySelector('.column .meta').textContent")
    tokens = expected["usage"]["completion_tokens"]
    assert meta.startswith(f"{tokens} token{'' if tokens == 1 else 's'} · ")
    browser.screenshot("chat")

    # The served demo image starts a new conversation; a second question is answered too.
    browser.click("#demo-image")
    browser.wait_for("return document.querySelectorAll('.msg').length === 0", "the conversation reset")
    browser.type("#question", "Describe the image briefly.")
    browser.click("#send")
    browser.wait_for("return document.querySelector('.msg.assistant[data-done]') !== null", "the second answer")


@pytest.mark.slow
def test_side_by_side_answers_equal_solo_api_calls_and_controls_shape_the_request(live_server, browser):
    browser.cmd("POST", "/url", {"url": live_server + "/"})
    browser.wait_for("return document.getElementById('status').textContent === 'idle'", "the model list")
    _tick(browser, ["base", "road4", "lora"])
    assert browser.js("return Array.from(document.querySelectorAll('.column')).map(c => c.dataset.model)") == [
        "base", "road4", "lora"]
    browser.click("#demo-image")
    browser.wait_for("return document.getElementById('preview').src.startsWith('data:image/png')", "the preview")
    # An example question is one click away.
    browser.click("#examples button")
    question = browser.js("return document.getElementById('question').value")
    assert question == "Describe the image briefly."
    browser.click("#send")
    side_by_side = _answers(browser, 3)
    demo_url = "data:image/png;base64," + base64.b64encode(httpx.get(f"{live_server}/demo.png").content).decode()
    solo = {m: _api_answer(live_server, m, question, demo_url)["choices"][0]["message"]["content"]
            for m in ("base", "road4", "lora")}
    assert side_by_side == solo and all(solo.values())
    assert len(set(solo.values())) > 1  # the columns really differ: each ran its own adapter
    browser.screenshot("side-by-side")

    # Sampling controls go into the request; the stop string and the token limit shape the answers.
    browser.js("window.sent = []; const f = window.fetch; window.fetch = (u, o) => {"
               " if (o && o.body) window.sent.push(JSON.parse(o.body)); return f(u, o); };")
    stop = solo["road4"].strip().split()[-1][:2]
    for css, value in (("#temperature", "0"), ("#top-p", "0.9"), ("#max-tokens", "5"), ("#stop", stop)):
        browser.js(f"document.querySelector('{css}').value = ''")
        browser.type(css, value)
    browser.click("#regenerate")
    regenerated = _answers(browser, 3)
    sent = browser.js("return window.sent")
    assert [body["model"] for body in sent] == ["base", "road4", "lora"]
    for body in sent:
        assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"]) == (0, 0.9, 5, [stop])
        assert len(body["messages"]) == 1  # regenerate replaces the last turn instead of adding one
    for model, text in regenerated.items():
        expected = _api_answer(live_server, model, question, demo_url, max_tokens=5, top_p=0.9, stop=[stop])
        assert text == expected["choices"][0]["message"]["content"], model
    assert stop not in regenerated["road4"]
    assert browser.js("return document.querySelectorAll('.column .msg.user').length") == 3

    # A server error shows inline, in the column, with the server's message.
    browser.js("document.querySelector('#max-tokens').value = '100000'")
    browser.type("#question", "Describe the image briefly.")
    browser.click("#send")
    error = browser.wait_for("return document.querySelector('.column-error').textContent", "the inline error")
    assert "max_tokens 100000 exceeds the server's limit" in error

    # An image dropped on the page or pasted into it becomes the image (and starts new conversations).
    for event in ("drop", "paste"):
        browser.js("document.getElementById('preview').src = ''")
        browser.js(
            "const bytes = Uint8Array.from(atob('" + _TINY_PNG + "'), c => c.charCodeAt(0));"
            "const data = new DataTransfer(); data.items.add(new File([bytes], 'x.png', {type: 'image/png'}));"
            + ("document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, "
               "bubbles: true, cancelable: true}));" if event == "drop" else
               "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true}));"))
        browser.wait_for("return document.getElementById('preview').src.startsWith('data:image/png')", event)
        assert browser.js("return document.querySelectorAll('.msg').length") == 0

    # Clear empties every column; keyboard only: focus the question, type, Enter submits.
    browser.click("#reset")
    assert browser.js("return document.querySelectorAll('.msg').length") == 0
    browser.js("document.querySelector('#max-tokens').value = '4'; document.getElementById('question').focus()")
    browser.keys("What is in the image?\ue007")  # U+E007: WebDriver's Enter key
    assert len(_answers(browser, 3)) == 3

    # Narrow screens (375 px): nothing wider than the viewport, columns stacked.
    browser.window(375, 800)
    overflow = browser.wait_for("return document.documentElement.clientWidth <= 375 && "
                                "[document.documentElement.scrollWidth - document.documentElement.clientWidth]",
                                "the narrow layout")
    assert overflow == [0]
    lefts = browser.js("return Array.from(document.querySelectorAll('.column')).map(c => c.getBoundingClientRect().left)")
    assert len(set(lefts)) == 1
    browser.screenshot("side-by-side-375px")


@pytest.mark.slow
def test_board_in_headless_chromium_shows_curves_and_the_eval_table(board_outputs, browser, run_server):
    from road_vlm.board.commands import create_board_app

    with run_server(create_board_app([board_outputs])) as url:
        browser.cmd("POST", "/url", {"url": url + "/"})
        rows = browser.wait_for("return document.querySelectorAll('#runs tbody tr').length", "the runs table")
        assert rows == 1
        curves = browser.js("return Array.from(document.querySelectorAll('.run polyline.series'))"
                            ".map(p => [p.dataset.name, p.getAttribute('points').split(' ').length])")
        assert curves[:2] == [["loss", 4], ["lr", 4]]
        checkpoints = browser.js("return Array.from(document.querySelectorAll('.eval-table tbody tr td:first-child'))"
                                 ".map(td => td.textContent)")
        assert checkpoints == ["base", "checkpoint-2", "checkpoint-4"]
        browser.screenshot("board")
        browser.window(375, 800)
        overflow = browser.wait_for("return document.documentElement.clientWidth <= 375 && "
                                    "[document.documentElement.scrollWidth - document.documentElement.clientWidth]",
                                    "the narrow layout")
        assert overflow == [0]
