"""HTTP guards shared by every road_vlm web app (the OpenAI server, the chat page, the board): the ``Host`` check."""

from __future__ import annotations

from typing import Any

from .openai.errors import APIError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def host_name(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8000`` -> ``::1``, ``Example:80`` -> ``example``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """Serve only requests addressed to this server's own names: a page on another site can make the browser send
    requests here, and DNS rebinding lets it read the answers. A plain ASGI middleware (Starlette's
    BaseHTTPMiddleware would hide client disconnects from the endpoints, and so from cancellation)."""

    def __init__(self, app: Any, allowed: set[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                response = APIError(421, f"Host {host!r} is not served here (--allowed-hosts)",
                                    code="host_not_allowed").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
