"""What the OpenAI routes share: the engine and scheduler, the limits, and reading a request into a model."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError

from road_vlm.adapters.compose import CompositionError
from road_vlm.generation import PromptTooLongError

from ..engine import ServingEngine, UnknownAdapterError
from ..scheduler import BatchScheduler
from ..messages import BadImageError, ImagePolicy, MessageError
from .errors import APIError, validation_error
from .metrics import ServerMetrics

Body = TypeVar("Body", bound=BaseModel)
Prepared = TypeVar("Prepared")


@dataclass
class ServerContext:
    engine: ServingEngine
    scheduler: BatchScheduler
    metrics: ServerMetrics
    images: ImagePolicy
    max_body_bytes: int
    default_max_tokens: int | None  # None: the rest of the context, at most max_tokens_cap
    max_tokens_cap: int

    @property
    def tokenizer(self) -> Any:
        return self.engine.processor.tokenizer

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits (token ids a request may name)."""
        config = self.engine.model.config
        return int(getattr(config, "text_config", config).vocab_size)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def resolve(self, request: Request, model: str) -> str | None:
        """The adapter a request's ``model`` names; remembered on the request for the metrics' model label."""
        try:
            adapter = self.engine.resolve(model)
        except UnknownAdapterError as err:
            raise APIError(404, str(err), param="model", code="model_not_found") from err
        except CompositionError as err:
            raise APIError(400, str(err), param="model", code="invalid_composition") from err
        request.state.model = model  # only names that resolve become labels (bounded cardinality)
        return adapter

    async def read(self, request: Request, model: type[Body]) -> Body:
        """The JSON body as ``model``: 415 unless JSON, 413 past max_body_bytes, 400 naming a bad field."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            # Also what keeps browsers from sending it cross-site without a CORS preflight (which fails).
            raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}",
                           code="unsupported_media_type")
        raw = await _read_body(request, self.max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"request body is not valid JSON: {err}") from err
        except RecursionError as err:
            raise APIError(400, "request body is nested too deeply") from err
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            return model.model_validate(body)
        except ValidationError as err:
            raise validation_error(err) from err


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


async def prepare_off_loop(make: Callable[[], Prepared], param: str) -> Prepared:
    """Run ``make`` (image decoding, tokenising) off the event loop; its errors become 400s naming ``param``."""
    try:
        return await run_in_threadpool(make)
    except BadImageError as err:
        raise APIError(400, str(err), param=err.param, code="invalid_image") from err
    except MessageError as err:
        raise APIError(400, str(err), param=err.param) from err
    except PromptTooLongError as err:
        raise APIError(400, str(err), param=param, code="context_length_exceeded") from err
    except ValueError as err:
        raise APIError(400, str(err), param=param) from err
