"""The request bodies of ``/v1/chat/completions`` and ``/v1/completions``: refuse, never ignore.

Every field a request may carry is declared here; any other is a 400 that names it (``extra="forbid"``). A field
the server declares but does not implement in some form (``tools``, a ``suffix``...) is refused by its validator
with code ``unsupported_parameter``. A few fields change nothing an answer depends on and are accepted as they
are: ``user``, ``metadata``, ``store``, ``parallel_tool_calls`` and ``tool_choice: "none" | "auto"`` (there are no
tools), ``stream_options.include_usage``. Field names, bounds and meanings follow vLLM's OpenAI server; the full
table is docs/openai_api.md.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from road_vlm.generation import PreparedPrompt, SamplingError, SamplingParams
from road_vlm.generation.requests import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS

from .errors import APIError

MAX_CHOICES = 16  # n: rows of one request
MAX_PROMPTS = 64  # prompts of one /v1/completions request
INT64 = 2**63


def _refuse(message: str) -> None:
    raise PydanticCustomError("unsupported_parameter", message)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class JsonSchemaFormat(_Strict):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # always strict here: the grammar admits only what the schema allows


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _GenerationFields(_Strict):
    """What both endpoints share: the model, sampling, length, stop, choices, streaming, informational fields."""

    model: str = Field(max_length=1024)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # -1 and 0: off (vLLM)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    min_tokens: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)  # informational

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if len(value) > MAX_LOGIT_BIAS:
                raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
            for key in value:
                if not key.isdigit():
                    raise ValueError(f"keys must be token ids, got {key[:32]!r}")
        return value

    def sampling(self, *, max_new: int, index: int, vocab_size: int, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        """The settings of choice ``index`` (its seed is ``seed + index``, so n choices differ and each repeats)."""
        bias = tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())
        for token, _ in bias:
            if token >= vocab_size:
                raise APIError(400, f"logit_bias: token id {token} is outside the vocabulary (size {vocab_size})",
                               param="logit_bias")
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        try:
            return SamplingParams(
                temperature=0.0 if self.temperature is None else float(self.temperature),  # greedy by default
                top_p=1.0 if self.top_p is None else float(self.top_p),
                max_new_tokens=max_new, stop=stop,
                seed=None if self.seed is None else (self.seed + index + INT64) % (2 * INT64) - INT64,
                top_k=max(0, self.top_k or 0), min_p=self.min_p or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
                presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                logit_bias=bias, min_tokens=self.min_tokens or 0, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except SamplingError as err:
            raise APIError(400, str(err)) from err


class ChatCompletionRequest(_GenerationFields):
    messages: list[Any] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # informational: there are no tools to call in parallel
    metadata: dict[str, str] | None = None  # informational
    store: bool | None = None  # informational: nothing is stored

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            _refuse("tool calling is not supported by this server (LLaVA-1.5 was not trained for it)")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none", "auto"):
            _refuse("tool calling is not supported by this server; only 'none' or 'auto' (no tools) are accepted")
        return value

    @property
    def requested_tokens(self) -> tuple[int | None, str]:
        """``max_completion_tokens`` (what newer clients send) or ``max_tokens``; both must agree if both come."""
        if self.max_completion_tokens is not None and self.max_tokens is not None \
                and self.max_completion_tokens != self.max_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens differ; send one of them",
                           param="max_completion_tokens")
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def top_logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_GenerationFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        if isinstance(value, list) and isinstance(value[0], (str, list)) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            _refuse("a suffix (insertion) is not supported by this server")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            _refuse("best_of is not supported by this server; use n")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class TokenizeRequest(_Strict):
    """vLLM's ``/tokenize``: a raw ``prompt`` (as /v1/completions takes it) or chat ``messages`` (as
    /v1/chat/completions renders them)."""

    model: str = Field(max_length=1024)
    prompt: str | None = None
    messages: list[Any] | None = None


class DetokenizeRequest(_Strict):
    model: str = Field(max_length=1024)
    tokens: list[Annotated[int, Field(ge=0)]]


def resolve_max_tokens(requested: int | None, param: str, prompt: PreparedPrompt, *, default: int | None,
                       cap: int) -> int:
    """A row's token budget: what the client asked for (at most ``cap``), otherwise the server's default, otherwise
    the rest of the context (at most ``cap``)."""
    if requested is not None:
        if requested > cap:
            raise APIError(400, f"{param} {requested} exceeds the server's limit of {cap} (--max-tokens-cap)",
                           param=param, code="max_tokens_exceeded")
        return requested
    if default is not None:
        return default
    return min(cap, prompt.context_limit - prompt.num_tokens)
