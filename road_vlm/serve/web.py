"""The web chat page, served by the same FastAPI app as the OpenAI API from files in ``static/``.

Why not Gradio: it is a large dependency with its own server and queue; this page is three small files that talk
to the same ``/v1/chat/completions`` endpoint (so web chat goes through the same batcher, adapters and error
handling as API clients), stream with ``fetch`` + a response body reader over server-sent events, and are easy
to drive in a headless browser test. Ticking several models sends the question to all of them at once: the
server answers them as one mixed-adapter batch, side by side. Conversations live in the page (OpenAI
``messages``); a new image starts new ones, as in LLaVA. Everything the page loads comes from this server (the
Content-Security-Policy says so to the browser too).
"""

from __future__ import annotations

import io
from functools import lru_cache
from importlib import resources

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response
from PIL import Image, ImageDraw

STATIC = {"chat.css": "text/css; charset=utf-8", "chat.js": "text/javascript; charset=utf-8"}
# The page needs nothing from elsewhere: images are data: URLs read in the page, the API is this origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@lru_cache(maxsize=None)
def static_file(name: str) -> str:
    return resources.files("road_vlm.serve").joinpath("static", name).read_text(encoding="utf-8")

@lru_cache(maxsize=1)
def demo_image_png() -> bytes:
    """A small generated picture (a red square and a yellow circle on blue) for trying the page offline."""
    image = Image.new("RGB", (96, 64), (40, 90, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 16, 40, 48), fill=(220, 30, 30))
    draw.ellipse((56, 16, 88, 48), fill=(240, 210, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def add_web_routes(app: FastAPI) -> None:
    """Serve the chat page at ``/`` (its assets under ``/static/``) and the demo image at ``/demo.png`` on an app
    from ``create_app``."""

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(static_file("chat.html"), headers=SECURITY_HEADERS)

    @app.get("/static/{name}")
    async def asset(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, "not found")
        return Response(static_file(name), media_type=STATIC[name], headers=SECURITY_HEADERS)

    @app.get("/demo.png")
    async def demo() -> Response:
        return Response(demo_image_png(), media_type="image/png")
