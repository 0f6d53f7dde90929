"""What a generation request holds (prompt, adapter, sampling settings, stream callback) and what it returns."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from road_vlm.generation.prompts import PreparedPrompt

TextCallback = Callable[[str], None]
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64


class SamplingError(ValueError):
    """Sampling settings that cannot be used."""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request: ``temperature`` 0 means greedy decoding; the answer ends before the first
    occurrence of any ``stop`` string (OpenAI's ``stop``: at most 4, each at most 64 characters)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0):
            raise SamplingError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP_STRINGS or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise SamplingError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings of at most "
                                f"{MAX_STOP_CHARS} characters, got {self.stop!r}")

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
    cancelled: threading.Event = field(default_factory=threading.Event)  # set to stop this row early


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (token limit) or "cancelled"
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
