"""``POST /v1/chat/completions``: messages through LLaVA-1.5's template (a custom system message fills its system
slot), ``n`` choices as rows of the running batch, optional logprobs, ``response_format`` as a per-row grammar."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from road_vlm.generation import GenerationRequest, GenerationResult
from road_vlm.generation.grammar import GrammarError, JsonGrammar
from road_vlm.generation.requests import TokenLogprob

from ..messages import parse_messages
from .context import ServerContext, prepare_off_loop
from .errors import APIError
from .protocol import ChatCompletionRequest, ResponseFormat, resolve_max_tokens
from .runner import run_rows, stream_rows, usage_of


async def _grammar(ctx: ServerContext, response_format: ResponseFormat | None) -> JsonGrammar | None:
    if response_format is None or response_format.type == "text":
        return None
    schema = None
    if response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format.json_schema")
        schema = response_format.json_schema.schema_
    try:
        return await run_in_threadpool(JsonGrammar, ctx.tokenizer, schema)  # compiling may take a moment
    except GrammarError as err:
        raise APIError(400, str(err), param="response_format", code="invalid_json_schema") from err


def _logprob_entry(ctx: ServerContext, token: int, logprob: float) -> dict[str, Any]:
    text = ctx.token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _logprobs(ctx: ServerContext, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    return {"content": [{**_logprob_entry(ctx, e.token, e.logprob),
                         "top_logprobs": [_logprob_entry(ctx, t, lp) for t, lp in e.top]} for e in entries]}


async def chat_completions(request: Request, ctx: ServerContext) -> Any:
    req = await ctx.read(request, ChatCompletionRequest)
    adapter = ctx.resolve(request, req.model)
    top = req.top_logprob_count
    if req.stream and top is not None:
        raise APIError(400, "logprobs are not streamed by this server; ask without stream", param="logprobs",
                       code="unsupported_parameter")
    requested, param = req.requested_tokens
    grammar = await _grammar(ctx, req.response_format)
    if grammar is not None and req.min_tokens:
        raise APIError(400, "min_tokens cannot be combined with response_format (the grammar decides where the "
                       "JSON ends)", param="min_tokens")

    def prepare() -> Any:
        conversation = parse_messages(req.messages, ctx.images)
        return ctx.engine.prepare(adapter, conversation.history, conversation.question, conversation.image,
                                  conversation.system)

    prompt = await prepare_off_loop(prepare, "messages")
    max_new = resolve_max_tokens(requested, param, prompt, default=ctx.default_max_tokens, cap=ctx.max_tokens_cap)
    rows = [GenerationRequest(prompt=prompt, adapter=adapter,
                              sampling=req.sampling(max_new=max_new, index=i, vocab_size=ctx.vocab_size,
                                                    logprobs=top),
                              constraint=None if grammar is None else grammar.constraint())
            for i in range(req.n)]
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if req.stream:
        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

        def usage(results: list[GenerationResult]) -> dict[str, Any]:
            return {**chunk(0, {}), "choices": [], "usage": usage_of(prompt.num_tokens, results)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return stream_rows(ctx, request, rows, opening=lambda i: chunk(i, {"role": "assistant", "content": ""}),
                           piece=lambda i, text: chunk(i, {"content": text}),
                           closing=lambda i, result: chunk(i, {}, result.finish_reason),
                           usage=usage if include_usage else None)

    results = await run_rows(ctx, request, rows)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": result.text},
                     "logprobs": _logprobs(ctx, result.logprobs), "finish_reason": result.finish_reason}
                    for i, result in enumerate(results)],
        "usage": usage_of(prompt.num_tokens, results),
    }
