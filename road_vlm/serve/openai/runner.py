"""Submitting a request's rows (its ``n`` choices, or its prompts) to the batch scheduler, and answering with their
results or as server-sent events. A client that leaves cancels its rows: their slots free at the next step."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from road_vlm.generation import GenerationRequest, GenerationResult

from ..scheduler import QueueFullError
from .context import ServerContext
from .errors import APIError

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks that its client is still there


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def _submit(ctx: ServerContext, rows: Sequence[GenerationRequest],
            ) -> list[concurrent.futures.Future[GenerationResult]]:
    """Submit every row, or none: a full queue cancels the rows already in and answers 429."""
    futures = []
    for row in rows:
        ctx.metrics.time_tokens(row)
        try:
            futures.append(ctx.scheduler.submit(row))
        except QueueFullError as err:
            for submitted in rows[:len(futures)]:
                submitted.cancelled.set()
            raise APIError(429, str(err), type_="rate_limit_error", code="queue_full") from err
    return futures


def _count(ctx: ServerContext, model: str, results: Sequence[GenerationResult]) -> None:
    ctx.metrics.count_tokens(model, sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))


async def run_rows(ctx: ServerContext, request: Request, rows: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Every row's result, in order; a client that disconnects first cancels them all."""
    futures = _submit(ctx, rows)
    waiting = [asyncio.wrap_future(f) for f in futures]
    try:
        while True:
            _, pending = await asyncio.wait(waiting, timeout=DISCONNECT_POLL_S)
            if not pending:
                break
            if await request.is_disconnected():
                for row in rows:
                    row.cancelled.set()  # they finish at the next decode step with finish_reason "cancelled"
        results = [w.result() for w in waiting]
    except asyncio.CancelledError:
        for row in rows:
            row.cancelled.set()
        raise
    except Exception as err:
        logger.exception("generation failed")
        raise APIError(500, f"generation failed: {err}", type_="server_error") from err
    _count(ctx, request.state.model, results)
    return results


def stream_rows(ctx: ServerContext, request: Request, rows: Sequence[GenerationRequest], *,
                opening: Callable[[int], dict[str, Any] | None], piece: Callable[[int, str], dict[str, Any]],
                closing: Callable[[int, GenerationResult], dict[str, Any]],
                usage: Callable[[list[GenerationResult]], dict[str, Any]] | None) -> Any:
    """Submit ``rows`` and answer with server-sent events: per row ``opening(index)`` (if any), ``piece(index,
    text)`` as text comes, ``closing(index, result)``; then ``usage(results)`` (if asked) and ``[DONE]``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
    for index, row in enumerate(rows):
        def on_text(text: str, index: int = index) -> None:  # called on the batcher thread
            loop.call_soon_threadsafe(events.put_nowait, ("text", index, text))

        row.on_text = on_text
    try:
        futures = _submit(ctx, rows)
    except APIError as err:
        return err.response()
    for index, future in enumerate(futures):
        future.add_done_callback(
            lambda f, index=index: loop.call_soon_threadsafe(events.put_nowait, ("done", index, f)))

    async def body() -> AsyncIterator[bytes]:
        try:
            for index in range(len(rows)):
                first = opening(index)
                if first is not None:
                    yield _sse(first)
            results: dict[int, GenerationResult] = {}
            while len(results) < len(rows):
                kind, index, value = await events.get()
                if kind == "text":
                    yield _sse(piece(index, value))
                    continue
                try:
                    results[index] = value.result()
                except Exception as err:  # headers are sent: report the failure in the stream
                    logger.exception("generation failed")
                    yield _sse(APIError(500, f"generation failed: {err}", type_="server_error").body())
                    yield _sse("[DONE]")
                    return
                yield _sse(closing(index, results[index]))
            _count(ctx, request.state.model, list(results.values()))
            if usage is not None:
                yield _sse(usage([results[i] for i in range(len(rows))]))
            yield _sse("[DONE]")
        finally:
            # Client gone (or stream finished): stop the rows at the next step instead of generating for nobody.
            for row in rows:
                row.cancelled.set()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def usage_of(prompt_tokens: int, results: Sequence[GenerationResult]) -> dict[str, int]:
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}
