"""Per-row sampling: every row of a batch keeps its own settings, its own random generator and its own grammar.

Rows that ask only for temperature / top_p (the common case) are sampled together in one vectorised pass
(:func:`sample_next`). A row with anything more gets a :class:`RowSampler`: transformers' logits processors for
what they implement per sequence (repetition penalty, min new tokens, logit bias, temperature, top-k, top-p,
min-p), OpenAI's presence / frequency penalties (transformers has none), a grammar's token mask, and a
``torch.Generator`` seeded from the request, so a seeded row draws the same numbers whatever runs beside it.

Order (vLLM's): logit bias and min_tokens, then penalties, then the grammar mask, then temperature and the
truncations. Greedy rows (temperature 0) take the argmax after the first three.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from road_vlm.generation.requests import SamplingParams, TokenConstraint, TokenLogprob


def sample_next(logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float]) -> torch.Tensor:
    """One next token per row: argmax for greedy rows (temperature 0), temperature + nucleus sampling otherwise
    (the global random generator)."""
    tokens = logits.argmax(dim=-1)
    temps = torch.tensor(temperatures, dtype=torch.float32, device=logits.device)
    sampled = (temps > 0).nonzero().squeeze(1)
    if sampled.numel() == 0:
        return tokens
    top_p = torch.tensor(top_ps, dtype=torch.float32, device=logits.device)[sampled]
    scaled = logits[sampled] / temps[sampled, None]
    # Nucleus filtering: keep the smallest set of tokens whose probability mass reaches top_p (always >= 1).
    sorted_scores, order = torch.sort(scaled, dim=-1, descending=True)
    probs = sorted_scores.softmax(dim=-1)
    remove_sorted = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    filtered = scaled.masked_fill(remove, float("-inf"))
    tokens[sampled] = torch.multinomial(filtered.softmax(dim=-1), 1).squeeze(1)
    return tokens


def _needs_own_pass(params: SamplingParams) -> bool:
    return bool(params.seed is not None or params.top_k or params.min_p or params.repetition_penalty != 1.0
                or params.presence_penalty or params.frequency_penalty or params.logit_bias or params.min_tokens)


class RowSampler:
    """The next-token choice of one row; ``record`` each token the row takes."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], eos_ids: set[int],
                 constraint: TokenConstraint | None = None) -> None:
        self.params = params
        self.constraint = constraint
        self.plain = constraint is None and not _needs_own_pass(params)
        self._ids = list(prompt_ids)  # prompt + answer: what the repetition penalty and min_tokens look at
        self._generated: Counter[int] = Counter()
        self._generator: torch.Generator | None = None
        self._before: list[LogitsProcessor] = []
        self._warpers: list[LogitsProcessor] = []
        if params.logit_bias:
            self._before.append(SequenceBiasLogitsProcessor([[[t], float(b)] for t, b in params.logit_bias]))
        if params.min_tokens:
            self._before.append(MinNewTokensLengthLogitsProcessor(len(self._ids), params.min_tokens,
                                                                  sorted(eos_ids)))
        if params.repetition_penalty != 1.0:
            self._before.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
        if not params.greedy:
            self._warpers.append(TemperatureLogitsWarper(float(params.temperature)))
            if params.top_k:
                self._warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self._warpers.append(TopPLogitsWarper(float(params.top_p)))
            if params.min_p:
                self._warpers.append(MinPLogitsWarper(float(params.min_p)))

    def _random(self, device: torch.device) -> torch.Generator | None:
        if self.params.seed is not None and self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.params.seed % 2**64)  # negative seeds are valid OpenAI seeds
        return self._generator

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits ``[vocab]`` (float32)."""
        scores = logits[None].clone()
        ids = torch.tensor([self._ids], dtype=torch.long, device=logits.device) if self._before else None
        for processor in self._before:
            scores = processor(ids, scores)
        if self._generated and (self.params.presence_penalty or self.params.frequency_penalty):
            tokens = torch.tensor(list(self._generated), device=logits.device)
            counts = torch.tensor(list(self._generated.values()), dtype=scores.dtype, device=logits.device)
            scores[0, tokens] -= self.params.frequency_penalty * counts + self.params.presence_penalty
        if self.constraint is not None:
            allowed = self.constraint.allowed(scores.shape[-1]).to(logits.device)
            scores[0, ~allowed] = float("-inf")
        if self.params.greedy:
            return int(scores.argmax(dim=-1))
        for warper in self._warpers:
            scores = warper(ids, scores)
        probs = scores.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._random(logits.device)))

    def record(self, token: int) -> None:
        self._ids.append(token)
        self._generated[token] += 1
        if self.constraint is not None:
            self.constraint.advance(token)


def next_tokens(samplers: Sequence[RowSampler], logits: torch.Tensor) -> list[int]:
    """One token per row of ``logits`` [rows, vocab] (float32): plain rows in one pass, the others each alone."""
    plain = [i for i, s in enumerate(samplers) if s.plain]
    tokens: list[int] = [0] * len(samplers)
    if plain:
        index = torch.tensor(plain, device=logits.device)
        chosen = sample_next(logits.index_select(0, index), [samplers[i].params.temperature for i in plain],
                             [samplers[i].params.top_p for i in plain]).tolist()
        for i, token in zip(plain, chosen):
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if not sampler.plain:
            tokens[i] = sampler.choose(logits[i])
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Each row's log-probability of ``tokens[row]`` under ``logits`` [rows, vocab] (the model's own
    distribution, before any sampling setting: vLLM's default), with the ``top`` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None]).squeeze(-1).tolist()
    best: Any = logprobs.topk(top, dim=-1) if top else None
    out = []
    for row, (token, value) in enumerate(zip(tokens, chosen)):
        alternatives = () if best is None else tuple(zip(best.indices[row].tolist(), best.values[row].tolist()))
        out.append(TokenLogprob(int(token), float(value), alternatives))
    return out
