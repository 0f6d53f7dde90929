"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError


class APIError(Exception):
    """An error answered as OpenAI-shaped JSON."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def validation_error(err: ValidationError) -> APIError:
    """A 400 naming the first bad field; a field the server does not implement gets code unsupported_parameter."""
    parts, first, code = [], None, None
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        first = first or loc
        if e["type"] in ("extra_forbidden", "unsupported_parameter"):
            code = code or "unsupported_parameter"
            detail = e["msg"] if e["type"] == "unsupported_parameter" else "not supported by this server"
            parts.append(f"'{loc}' is {detail}" if e["type"] == "extra_forbidden" else f"'{loc}': {detail}")
        else:
            parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return APIError(400, "invalid request body: " + "; ".join(parts), param=first, code=code)
