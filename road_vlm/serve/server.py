"""OpenAI-compatible HTTP API over the many-adapter batch scheduler (FastAPI): the app and its routes.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``model`` = adapter name, the base model's
name for no adapter, or ``"a+b"`` for a composition of adapters trained on disjoint pair subsets; ``stream: true``
gives server-sent events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/stats`` (batch composition
counters), ``POST /tokenize``, ``POST /detokenize``, ``GET /metrics`` (Prometheus), ``GET /health``; with
``web_ui=True`` also the chat page at ``/``. The request bodies, fields and answers live in ``openai/``; every
field and endpoint, accepted or refused, is listed in docs/openai_api.md.

Every bad request gets an OpenAI-shaped JSON error (``{"error": {"message", "type", "param", "code"}}``) and the
server keeps running: malformed body or a field the server does not implement -> 400 naming the field, unknown
model -> 404, adapters that do not compose -> 400, bad image -> 400, prompt beyond the context limit -> 400, body
too large -> 413, not ``application/json`` -> 415, queue full -> 429, a ``Host`` header that is not the server's ->
421 (DNS rebinding), anything unexpected -> 500, all as JSON. Limits and how to expose the server safely:
docs/security.md.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from road_vlm.generation import context_limit

from .engine import ServingEngine
from .http_guards import LOOPBACK_HOSTS, HostCheck, host_name
from .messages import DEFAULT_IMAGE_POLICY, ImagePolicy
from .openai.chat import chat_completions
from .openai.completions import completions
from .openai.context import ServerContext
from .openai.errors import APIError
from .openai.metrics import ServerMetrics
from .openai.tokenize import detokenize, tokenize
from .scheduler import BatchScheduler

logger = logging.getLogger(__name__)


def create_app(
    engine: ServingEngine,
    *,
    max_batch_size: int = 8,
    max_queue: int = 64,
    batch_window_s: float = 0.02,
    batching: str = "continuous",
    max_prefill_tokens: int = 4096,
    default_max_tokens: int | None = None,
    max_tokens_cap: int = 2048,
    images: ImagePolicy | None = None,
    max_body_bytes: int | None = None,
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
    api_key: str | None = None,
    web_ui: bool = False,
) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the batch scheduler (``app.state.scheduler``).

    ``batching``: "continuous" (requests join the running batch between decode steps) or "static";
    ``max_prefill_tokens`` bounds the newcomers' prefill between two decode steps (continuous batching).
    ``images``: what an image part may be (source, bytes, pixels, formats, concurrent decodes). ``max_body_bytes``
    (default: room for one base64 image of ``images.max_bytes`` plus 1 MiB of text) bounds a request before it
    is parsed. ``max_tokens_cap`` bounds a request's ``max_tokens``; a request without one generates up to
    ``default_max_tokens``, or when that is None up to the end of the context (at most ``max_tokens_cap``).
    ``allowed_hosts``: the ``Host`` names served (None: any; only behind a proxy that checks them).
    """
    images = images or DEFAULT_IMAGE_POLICY
    if max_body_bytes is None:
        max_body_bytes = images.max_bytes * 4 // 3 + (1 << 20)
    if default_max_tokens is not None and default_max_tokens > max_tokens_cap:
        raise ValueError(f"default max_tokens {default_max_tokens} exceeds the cap {max_tokens_cap}")
    allowed = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
    scheduler = BatchScheduler(
        engine, max_batch_size=max_batch_size, max_queue=max_queue, batch_window_s=batch_window_s, batching=batching,
        max_prefill_tokens=max_prefill_tokens,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.close)

    app = FastAPI(title="road_vlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.scheduler = scheduler
    ctx = ServerContext(engine=engine, scheduler=scheduler, metrics=ServerMetrics(scheduler), images=images,
                        max_body_bytes=max_body_bytes, default_max_tokens=default_max_tokens,
                        max_tokens_cap=max_tokens_cap)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return APIError(500, f"internal server error ({type(err).__name__})", type_="server_error").response()

    if allowed is not None:
        app.add_middleware(HostCheck, allowed=allowed)

    def _check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "pending": scheduler.pending}

    @app.get("/metrics")
    async def metrics(request: Request) -> Any:
        _check_key(request)
        return ctx.metrics.response()

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_key(request)
        created = int(time.time())

        def entry(name: str, adapter: str | None) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": created, "owned_by": "road_vlm",
                    "max_model_len": context_limit(engine.model, engine.prompt_format(adapter))}

        data = [{**entry(engine.base_name, None), "adapter": None}]
        data += [{**entry(name, name), "root": engine.base_name}  # no directory: paths are not the client's business
                 for name in engine.adapter_names]
        return {"object": "list", "data": data}

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict[str, Any]:
        _check_key(request)
        return {**engine.stats.as_dict(), "pending": scheduler.pending, "max_batch_size": max_batch_size,
                "max_queue": max_queue, "batch_window_s": batch_window_s, "batching": batching,
                "max_prefill_tokens": max_prefill_tokens}

    def _route(path: str, handler: Any) -> None:
        async def endpoint(request: Request) -> Any:
            _check_key(request)
            return await ctx.metrics.count_request(path, request, lambda: handler(request, ctx))

        app.add_api_route(path, endpoint, methods=["POST"], name=handler.__name__)

    _route("/v1/chat/completions", chat_completions)
    _route("/v1/completions", completions)
    _route("/tokenize", tokenize)
    _route("/detokenize", detokenize)

    if web_ui:
        from .web import add_web_routes

        add_web_routes(app)
    return app
