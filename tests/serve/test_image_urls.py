"""http(s) image URLs: off by default; when on, only public addresses are fetched (no private, loopback or
link-local targets), without redirects, within a byte and a time limit."""

from __future__ import annotations

import http.server
import ipaddress
import threading
from collections.abc import Iterator

import pytest

from road_vlm.serve.image_fetch import ImageFetchError, fetch_image_bytes
from road_vlm.serve.messages import BadImageError, ImagePolicy, parse_messages


def _ask(url: str, policy: ImagePolicy):
    return parse_messages([{"role": "user", "content": [
        {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": url}}]}], policy)


@pytest.fixture(scope="module")
def image_host(image_path) -> Iterator[str]:
    """A loopback HTTP server: /image.png, /big (over the limit), /redirect (to the image)."""
    png = image_path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/image.png")
                self.end_headers()
                return
            body = png if self.path == "/image.png" else b"x" * 5000
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()  # no Content-Length: the limit must hold while reading
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_image_urls_are_refused_unless_the_server_allows_them(image_host):
    with pytest.raises(BadImageError, match="--allow-image-urls"):
        _ask(f"{image_host}/image.png", ImagePolicy())


@pytest.mark.parametrize("url", ["http://127.0.0.1/x.png", "http://localhost:8000/x.png", "http://[::1]/x.png",
                                 "http://10.0.0.7/x.png", "http://192.168.1.1/x.png", "http://169.254.169.254/latest",
                                 "http://0.0.0.0/x.png", "http://[::ffff:127.0.0.1]/x.png"])
def test_private_loopback_and_link_local_targets_are_never_fetched(url):
    with pytest.raises(BadImageError, match="not a public address"):
        _ask(url, ImagePolicy(allow_image_urls=True))


def test_other_schemes_and_credentials_are_refused():
    for url, needle in [("http://user:pw@example.com/x.png", "credentials")]:
        with pytest.raises(BadImageError, match=needle):
            _ask(url, ImagePolicy(allow_image_urls=True))
    with pytest.raises(ImageFetchError, match="http:// or https://"):
        fetch_image_bytes("ftp://example.com/x.png", max_bytes=10, timeout_s=1)


def test_the_fetch_is_pinned_bounded_and_follows_no_redirect(image_host, image_path):
    # The loopback server stands in for a public host: the address check is the one thing swapped.
    loopback = lambda address: address == ipaddress.ip_address("127.0.0.1")  # noqa: E731
    assert fetch_image_bytes(f"{image_host}/image.png", max_bytes=10_000, timeout_s=5,
                             allowed=loopback) == image_path.read_bytes()
    with pytest.raises(ImageFetchError, match="larger than the server's limit of 1000 bytes"):
        fetch_image_bytes(f"{image_host}/big", max_bytes=1000, timeout_s=5, allowed=loopback)
    with pytest.raises(ImageFetchError, match="redirects are not followed"):
        fetch_image_bytes(f"{image_host}/redirect", max_bytes=10_000, timeout_s=5, allowed=loopback)
