"""The web chat page: served with its controls, and answering in a real headless Chromium."""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from road_vlm.serve.server import create_app

LOCAL = "http://127.0.0.1"  # the Host the server accepts (it refuses others: DNS rebinding)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key


def test_page_and_demo_image_are_served(engine):
    with TestClient(create_app(engine, web_ui=True), base_url=LOCAL) as client:
        page = client.get("/")
        demo = client.get("/demo.png")
        api_only = TestClient(create_app(engine), base_url=LOCAL).get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element_id in ("model", "image-input", "demo-image", "question", "send", "reset", "log", "error"):
        assert f'id="{element_id}"' in page.text
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
        try:
            yield web
        finally:
            web.quit()
    finally:
        driver.terminate()
        driver.wait(30)
        log.close()


@pytest.mark.slow
def test_web_chat_uploads_an_image_and_streams_the_answer_in_headless_chromium(live_server, browser, image_path):
    browser.cmd("POST", "/url", {"url": live_server + "/"})
    browser.wait_for("return document.getElementById('status').textContent === 'idle'", "the model list")
    options = browser.js("return Array.from(document.querySelectorAll('#model option')).map(o => o.value)")
    assert options == ["base", "road4", "road1proj", "lora"]
    browser.js("document.getElementById('model').value = 'road1proj'")

    browser.type("#image-input", str(image_path))  # a real file upload through the file input
    browser.wait_for("return document.getElementById('preview').src.startsWith('data:image/png')", "the preview")
    browser.type("#question", "What is in the image?")
    browser.click("#send")
    answer = browser.wait_for(
        "const a = document.querySelector('.msg.assistant[data-done]'); return a && a.textContent",
        "the answer")

    # The page's answer is the API's answer for the same adapter and image.
    data_url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    expected = httpx.post(f"{live_server}/v1/chat/completions", timeout=120, json={
        "model": "road1proj", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in the image?"},
            {"type": "image_url", "image_url": {"url": data_url}}]}]}).json()
    assert answer == expected["choices"][0]["message"]["content"] and answer
    assert browser.js("return document.getElementById('error').textContent") == ""

    # The served demo image starts a new conversation; a second question is answered too.
    browser.click("#demo-image")
    browser.wait_for("return document.querySelectorAll('.msg').length === 0", "the conversation reset")
    browser.type("#question", "Describe the image briefly.")
    browser.click("#send")
    browser.wait_for("return document.querySelector('.msg.assistant[data-done]') !== null", "the second answer")
