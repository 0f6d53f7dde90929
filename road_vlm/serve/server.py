"""OpenAI-compatible HTTP API over the many-adapter batch scheduler (FastAPI).

Routes: ``POST /v1/chat/completions`` (``model`` = adapter name, the base model's name for no adapter, or
``"a+b"`` for a composition of adapters trained on disjoint pair subsets; ``stream: true`` gives server-sent events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/stats``
(batch composition counters), ``GET /health``; with ``web_ui=True`` also the chat page at ``/``.

Every bad request gets an OpenAI-shaped JSON error (``{"error": {"message", "type", "param", "code"}}``) and the
server keeps running: malformed body -> 400, unknown model -> 404, adapters that do not compose -> 400, bad image -> 400, prompt beyond the context
limit -> 400, body too large -> 413, not ``application/json`` -> 415, queue full -> 429, a ``Host`` header that
is not the server's -> 421 (DNS rebinding), anything unexpected -> 500, all as JSON. Limits and how to expose the
server safely: docs/security.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from road_vlm.adapters.compose import CompositionError
from road_vlm.generation import GenerationRequest, GenerationResult, PromptTooLongError, SamplingError, SamplingParams

from .batching import BatchScheduler, QueueFullError, ServingEngine, UnknownAdapterError
from .messages import DEFAULT_IMAGE_POLICY, BadImageError, ImagePolicy, MessageError, parse_messages

logger = logging.getLogger(__name__)

# Request fields that would change the answer in ways this server does not implement: refuse, never ignore.
_UNSUPPORTED = {
    "n": lambda v: v not in (None, 1),
    "tools": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none"),
    "functions": lambda v: bool(v),
    "function_call": lambda v: v not in (None, "none"),
    "logprobs": lambda v: bool(v),
    "top_logprobs": lambda v: v not in (None, 0),
    "response_format": lambda v: v not in (None, {"type": "text"}),
    "seed": lambda v: v is not None,
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "logit_bias": lambda v: bool(v),
}


class ChatCompletionRequest(BaseModel):
    """The fields of an OpenAI chat completion request this server uses (others are checked by _UNSUPPORTED)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Any] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """OpenAI's ``stop`` (a string or a list of them) as a tuple; SamplingParams checks the bounds."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


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


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        first = first or loc
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "invalid request body: " + "; ".join(parts), first


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks that its client is still there


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


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {int(declared)} bytes is larger than the server's limit of {limit} "
                       "bytes (--max-body-bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is larger than the server's limit of {limit} bytes "
                           "(--max-body-bytes)", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    engine: ServingEngine,
    *,
    max_batch_size: int = 8,
    max_queue: int = 64,
    batch_window_s: float = 0.02,
    batching: str = "continuous",
    max_prefill_tokens: int = 4096,
    default_max_tokens: int = 256,
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
    is parsed. ``max_tokens_cap`` bounds a request's ``max_tokens``. ``allowed_hosts``: the ``Host`` names
    served (None: any; only behind a proxy that checks them).
    """
    images = images or DEFAULT_IMAGE_POLICY
    if max_body_bytes is None:
        max_body_bytes = images.max_bytes * 4 // 3 + (1 << 20)
    if default_max_tokens > max_tokens_cap:
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

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_key(request)
        created = int(time.time())
        data = [{"id": engine.base_name, "object": "model", "created": created, "owned_by": "road_vlm",
                 "adapter": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "road_vlm",
                  "root": engine.base_name}  # no directory: paths on this machine are not the client's business
                 for name in engine.adapter_names]
        return {"object": "list", "data": data}

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict[str, Any]:
        _check_key(request)
        return {**engine.stats.as_dict(), "pending": scheduler.pending, "max_batch_size": max_batch_size,
                "max_queue": max_queue, "batch_window_s": batch_window_s, "batching": batching,
                "max_prefill_tokens": max_prefill_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        _check_key(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            # Also what keeps browsers from sending it cross-site without a CORS preflight (which fails).
            raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}",
                           code="unsupported_media_type")
        raw = await _read_body(request, max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"request body is not valid JSON: {err}") from err
        except RecursionError as err:
            raise APIError(400, "request body is nested too deeply") from err
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as err:
            message, param = _validation_message(err)
            raise APIError(400, message, param=param) from err
        for name, bad in _UNSUPPORTED.items():
            if name in body and bad(body[name]):
                raise APIError(400, f"'{name}'={body[name]!r} is not supported by this server", param=name,
                               code="unsupported_parameter")
        try:
            adapter = engine.resolve(req.model)
        except UnknownAdapterError as err:
            raise APIError(404, str(err), param="model", code="model_not_found") from err
        except CompositionError as err:
            raise APIError(400, str(err), param="model", code="invalid_composition") from err
        max_new = req.max_completion_tokens or req.max_tokens or default_max_tokens
        if max_new > max_tokens_cap:
            raise APIError(400, f"max_tokens {max_new} exceeds the server's limit of {max_tokens_cap} "
                           "(--max-tokens-cap)", param="max_tokens", code="max_tokens_exceeded")
        try:
            sampling = SamplingParams(
                temperature=0.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                max_new_tokens=max_new,
                stop=_stop_strings(req.stop),
            )
        except SamplingError as err:
            raise APIError(400, str(err)) from err

        def prepare() -> Any:
            history, question, image = parse_messages(req.messages, images)
            return engine.prepare(adapter, history, question, image)

        try:
            prompt = await run_in_threadpool(prepare)  # image decoding and tokenising stay off the event loop
        except BadImageError as err:
            raise APIError(400, str(err), param=err.param, code="invalid_image") from err
        except MessageError as err:
            raise APIError(400, str(err), param=err.param) from err
        except PromptTooLongError as err:
            raise APIError(400, str(err), param="messages", code="context_length_exceeded") from err
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from err

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        gen_request = GenerationRequest(prompt=prompt, adapter=adapter, sampling=sampling)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return _stream(scheduler, gen_request, completion_id, created, req.model, include_usage)
        try:
            future = scheduler.submit(gen_request)
        except QueueFullError as err:
            raise APIError(429, str(err), type_="rate_limit_error", code="queue_full") from err
        try:
            result: GenerationResult = await _await_unless_disconnected(request, future, gen_request)
        except asyncio.CancelledError:
            gen_request.cancelled.set()
            raise
        except Exception as err:
            logger.exception("generation failed")
            raise APIError(500, f"generation failed: {err}", type_="server_error") from err
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    if web_ui:
        from .web import add_web_routes

        add_web_routes(app)
    return app


async def _await_unless_disconnected(request: Request, future: concurrent.futures.Future[GenerationResult],
                                     gen_request: GenerationRequest) -> GenerationResult:
    """The result, or cancellation of the row as soon as the client has gone (the slot frees at the next step)."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            gen_request.cancelled.set()
            return await waiting  # finishes at the next decode step with finish_reason "cancelled"


def _stream(scheduler: BatchScheduler, request: GenerationRequest, completion_id: str, created: int,
            model: str, include_usage: bool) -> Any:
    """Submit ``request`` with a streaming callback and answer with server-sent events."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_text(piece: str) -> None:  # called on the batcher thread
        loop.call_soon_threadsafe(events.put_nowait, ("text", piece))

    request.on_text = on_text
    try:
        future = scheduler.submit(request)
    except QueueFullError as err:
        return APIError(429, str(err), type_="rate_limit_error", code="queue_full").response()

    def on_done(f: concurrent.futures.Future[GenerationResult]) -> None:
        loop.call_soon_threadsafe(events.put_nowait, ("done", f))

    future.add_done_callback(on_done)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    async def body() -> AsyncIterator[bytes]:
        try:
            yield _sse(chunk({"role": "assistant", "content": ""}))
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield _sse(chunk({"content": value}))
                    continue
                try:
                    result = value.result()
                except Exception as err:  # headers are sent: report the failure in the stream
                    logger.exception("generation failed")
                    yield _sse(APIError(500, f"generation failed: {err}", type_="server_error").body())
                    yield _sse("[DONE]")
                    return
                yield _sse(chunk({}, result.finish_reason))
                if include_usage:
                    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                             "total_tokens": result.prompt_tokens + result.completion_tokens}
                    yield _sse({**chunk({}), "choices": [], "usage": usage})
                yield _sse("[DONE]")
                return
        finally:
            # Client gone (or stream finished): stop this row at the next step instead of generating for nobody.
            request.cancelled.set()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
