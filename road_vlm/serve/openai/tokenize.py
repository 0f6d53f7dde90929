"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's): what a prompt becomes, token by token. For chat
``messages`` the answer also shows the prompt text the template builds, with the system text in its slot."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from road_vlm.data.template import render_prompt
from road_vlm.generation import PreparedPrompt

from ..messages import parse_messages
from .context import ServerContext, prepare_off_loop
from .errors import APIError
from .protocol import DetokenizeRequest, TokenizeRequest


async def tokenize(request: Request, ctx: ServerContext) -> dict[str, Any]:
    req = await ctx.read(request, TokenizeRequest)
    adapter = ctx.resolve(request, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "send either prompt or messages", param="prompt")
    if req.messages is not None:
        def prepare() -> tuple[str, PreparedPrompt]:
            c = parse_messages(req.messages, ctx.images)  # refuses what chat refuses
            text = render_prompt(c.history, c.question, has_image=c.image is not None, system=c.system)
            return text, ctx.engine.prepare(adapter, c.history, c.question, c.image, c.system)

        text, prompt = await prepare_off_loop(prepare, "messages")
    else:
        text = req.prompt or ""
        prompt = await prepare_off_loop(lambda: ctx.engine.prepare_raw(adapter, text), "prompt")
    return {"count": prompt.num_tokens, "max_model_len": prompt.context_limit, "tokens": prompt.input_ids,
            "prompt": text}


async def detokenize(request: Request, ctx: ServerContext) -> dict[str, Any]:
    req = await ctx.read(request, DetokenizeRequest)
    ctx.resolve(request, req.model)
    bad = [t for t in req.tokens if t >= ctx.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {ctx.vocab_size})", param="tokens")
    return {"prompt": ctx.tokenizer.decode(req.tokens)}
