"""``POST /v1/completions``: a raw prompt (text, or token ids used exactly as sent: no BOS added) continued
without the chat template; ``echo`` + ``logprobs`` score the prompt (``max_tokens: 0`` scores without
generating), which is what lm-evaluation-harness's ``local-completions`` loglikelihood tasks send."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request

from road_vlm.generation import GenerationRequest, GenerationResult, PreparedPrompt
from road_vlm.generation.requests import TokenLogprob

from .context import ServerContext, prepare_off_loop
from .errors import APIError
from .protocol import CompletionRequest, resolve_max_tokens
from .runner import run_rows, stream_rows, usage_of


def _logprobs(ctx: ServerContext, entries: list[tuple[TokenLogprob | None, int]]) -> dict[str, Any]:
    """The legacy completions shape: parallel lists; ``top_logprobs`` maps token text to log-probability and holds
    the token itself too (as vLLM's), so ``logprob == max(top)`` tells a greedy token."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for entry, token in entries:
        text = ctx.token_text(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry.logprob)
        top = {ctx.token_text(t): lp for t, lp in entry.top}
        top[text] = entry.logprob
        out["top_logprobs"].append(top)
    return out


def _choice(ctx: ServerContext, index: int, prompt_text: str, prompt: PreparedPrompt, result: GenerationResult,
            echo: bool, logprobs: bool) -> dict[str, Any]:
    entries: list[tuple[TokenLogprob | None, int]] = []
    if logprobs:
        if echo:
            entries += list(zip(result.prompt_logprobs or [], prompt.input_ids))
        entries += [(e, e.token) for e in result.logprobs or []]
    return {"index": index, "text": (prompt_text if echo else "") + result.text,
            "logprobs": _logprobs(ctx, entries) if logprobs else None, "finish_reason": result.finish_reason}


async def completions(request: Request, ctx: ServerContext) -> Any:
    req = await ctx.read(request, CompletionRequest)
    adapter = ctx.resolve(request, req.model)
    if req.stream and (req.echo or req.logprobs is not None):
        raise APIError(400, "echo and logprobs are not streamed by this server; ask without stream",
                       param="stream", code="unsupported_parameter")
    prompts: list[tuple[str, PreparedPrompt]] = []
    for k, given in enumerate(req.prompts):
        param = "prompt" if len(req.prompts) == 1 else f"prompt[{k}]"
        prepared = await prepare_off_loop(lambda given=given: ctx.engine.prepare_raw(adapter, given), param)
        text = given if isinstance(given, str) else ctx.tokenizer.decode(given)
        prompts.append((text, prepared))
    rows: list[GenerationRequest] = []
    for text, prompt in prompts:
        max_new = resolve_max_tokens(req.max_tokens, "max_tokens", prompt, default=ctx.default_max_tokens,
                                     cap=ctx.max_tokens_cap)
        for i in range(req.n):
            sampling = req.sampling(max_new=max_new, index=i, vocab_size=ctx.vocab_size, logprobs=req.logprobs,
                                    prompt_logprobs=req.logprobs if req.echo else None)
            rows.append(GenerationRequest(prompt=prompt, adapter=adapter, sampling=sampling))
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(p.num_tokens for _, p in prompts)

    def body(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": completion_id, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, **extra}

    if req.stream:
        def piece(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
            return body([{"index": index, "text": text, "logprobs": None, "finish_reason": finish}])

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return stream_rows(ctx, request, rows, opening=lambda i: None, piece=piece,
                           closing=lambda i, result: piece(i, "", result.finish_reason),
                           usage=(lambda results: body([], usage=usage_of(prompt_tokens, results)))
                           if include_usage else None)

    results = await run_rows(ctx, request, rows)
    choices = [_choice(ctx, i, *prompts[i // req.n], result, req.echo, req.logprobs is not None)
               for i, result in enumerate(results)]
    return body(choices, usage=usage_of(prompt_tokens, results))
