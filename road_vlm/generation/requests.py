"""What a generation request holds (prompt, adapter, sampling settings, stream callback) and what it returns."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from road_vlm.generation.prompts import PreparedPrompt

TextCallback = Callable[[str], None]
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64


class TokenConstraint(Protocol):
    """Which tokens a row may sample next (a grammar); it follows the row's tokens through ``advance``."""

    def allowed(self, vocab_size: int) -> torch.Tensor: ...  # bool [vocab_size]

    def advance(self, token: int) -> None: ...


class SamplingError(ValueError):
    """Sampling settings that cannot be used."""


MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
MAX_LOGIT_BIAS = 300  # entries of a logit_bias map (OpenAI documents 300 as its bound too)


def _number_in(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SamplingError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def _count(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise SamplingError(f"{name} must be an integer in [{low}, {high if high is not None else 'inf'}], "
                            f"got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request (one row; vLLM's names and meanings).

    ``temperature`` 0 means greedy decoding; the answer ends before the first occurrence of any ``stop`` string
    (at most 4, each at most 64 characters). ``seed`` gives the row its own random generator (same seed and
    prompt -> same answer, whatever else runs in the batch). ``top_k`` 0 and ``min_p`` 0 are off.
    ``repetition_penalty`` (1 = off) divides the logits of tokens seen in the prompt or answer (transformers'
    rule); ``presence_penalty`` / ``frequency_penalty`` subtract from the logits of tokens already generated
    (once / per occurrence: OpenAI's rule). ``logit_bias``: (token id, bias) pairs added to the logits.
    ``min_tokens``: EOS is masked until that many tokens are generated. ``logprobs``: None, or how many top
    alternatives to report with each generated token's log-probability (0 = only the chosen token);
    ``prompt_logprobs`` the same for the prompt's tokens. ``max_new_tokens`` 0 generates nothing (scoring).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        _number_in("temperature", self.temperature, 0.0, 100.0)
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _count("max_new_tokens", self.max_new_tokens, 0)
        if not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP_STRINGS or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise SamplingError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings of at most "
                                f"{MAX_STOP_CHARS} characters, got {self.stop!r}")
        if self.seed is not None:
            _count("seed", self.seed, -(2**63), 2**63 - 1)
        _count("top_k", self.top_k, 0)
        _number_in("min_p", self.min_p, 0.0, 1.0)
        if not (isinstance(self.repetition_penalty, (int, float)) and 0.0 < self.repetition_penalty <= 2.0):
            raise SamplingError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        _number_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not isinstance(self.logit_bias, tuple) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingError(f"logit_bias must hold at most {MAX_LOGIT_BIAS} (token id, bias) pairs")
        for token, bias in self.logit_bias:
            _count("logit_bias token id", token, 0)
            _number_in(f"logit_bias[{token}]", bias, -100.0, 100.0)
        _count("min_tokens", self.min_tokens, 0, self.max_new_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name), 0, MAX_TOP_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """One row of a batch."""

    prompt: PreparedPrompt
    adapter: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    on_text: TextCallback | None = None  # called with each new piece of text, from the generating thread
    constraint: TokenConstraint | None = None  # e.g. a JSON grammar: which tokens may come next (one per row)
    on_token: Callable[[int], None] | None = None  # called with each generated token id (metrics' timings)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set to stop this row early


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (before any sampling setting), and the most likely tokens."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (token limit) or "cancelled"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when sampling.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (the first has none)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
