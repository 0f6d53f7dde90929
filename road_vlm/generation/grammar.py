"""Structured output: a JSON grammar as a per-row token mask (llguidance).

llguidance (the Rust engine behind guidance, one of vLLM's structured-output backends) ships CPU wheels with no
dependencies, compiles a JSON schema lazily (no up-front automaton over the vocabulary, so a schema costs
milliseconds rather than seconds) and reports an unusable schema as a message instead of crashing. One
:class:`JsonGrammar` is compiled and checked per request; every row (each of ``n`` choices) follows it with its own
matcher (:meth:`JsonGrammar.constraint`), applied by ``sampling.RowSampler`` as a token mask.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch

MAX_SCHEMA_CHARS = 64 * 1024  # a schema is client input: bounded before it is compiled

_tokenizers: dict[int, Any] = {}
_tokenizers_lock = threading.Lock()


class GrammarError(ValueError):
    """A schema that cannot be used (the message says why)."""


def _ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a fast HF tokenizer (costly to build: once per tokenizer)."""
    import llguidance.hf

    with _tokenizers_lock:
        key = id(tokenizer)
        if key not in _tokenizers:
            _tokenizers[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer))
        return _tokenizers[key][1]


class JsonGrammar:
    """A JSON grammar for one request: ``schema`` None accepts any JSON object (``json_object`` mode).

    Output is compact JSON (no free whitespace): a model that is not trained for JSON could otherwise fill its
    whole budget with spaces and newlines, which the grammar would allow.
    """

    def __init__(self, tokenizer: Any, schema: dict[str, Any] | None) -> None:
        from llguidance import LLMatcher

        if schema is not None and len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the JSON schema is longer than {MAX_SCHEMA_CHARS} characters")
        try:
            self.grammar = LLMatcher.grammar_from_json_schema(
                {"type": "object"} if schema is None else schema, defaults={"whitespace_flexible": False})
        except ValueError as err:
            raise GrammarError(f"invalid JSON schema: {err}") from err
        self.tokenizer = _ll_tokenizer(tokenizer)
        error = LLMatcher.validate_grammar(self.grammar, self.tokenizer)
        if error:
            raise GrammarError(f"invalid JSON schema: {error}")

    def constraint(self) -> JsonConstraint:
        return JsonConstraint(self)


class JsonConstraint:
    """One row's position in a :class:`JsonGrammar` (implements ``requests.TokenConstraint``)."""

    def __init__(self, grammar: JsonGrammar) -> None:
        from llguidance import LLMatcher

        self._matcher = LLMatcher(grammar.tokenizer, grammar.grammar, log_level=0)
        self._check()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"structured output failed: {self._matcher.get_error()}")

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Tokens the grammar allows next (EOS once the JSON is complete); ids past the tokenizer's are never."""
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        self._check()
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, bits.shape[0])
        mask[:n] = torch.from_numpy(bits[:n].astype(bool))
        return mask

    def advance(self, token: int) -> None:
        self._matcher.consume_token(token)
        self._check()
