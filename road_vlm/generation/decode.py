"""The decode loop: rows with their own adapter, sampling settings and image share one KV cache, and may join
between decode steps and leave when done (iteration-level, "continuous" batching).

transformers' own continuous-batching manager takes token ids only (no ``pixel_values``), so it cannot serve
LLaVA; this loop uses transformers' ``DynamicCache`` and the model's ordinary forward, and adds what serving
RoAd needs: the adapter of each row (``per_sample_adapters``), per-row sampling and limits (``sampling.py``),
log-probabilities of the answer and (for scoring) of the prompt, and row admission:

- ``admit`` prefills the newcomers as one left-padded forward of their own (the running rows wait for that one
  forward, not for whole answers), then left-pads the two caches to a common length and stacks them. Each row
  keeps explicit position ids (its count of real tokens), so padding never moves a token's rotary position.
- ``step`` feeds every running row its last token; rows that end (EOS, token limit, cancelled) are dropped from
  the cache at once, and cache columns that only padding uses any more are trimmed.

A static batch is the special case of admitting once and stepping until empty (:func:`generate_batch`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from road_vlm.generation.detokenize import IncrementalDetokenizer
from road_vlm.generation.requests import GenerationRequest, GenerationResult, TokenLogprob
from road_vlm.generation.sampling import RowSampler, next_tokens, token_logprobs

Finished = tuple[GenerationRequest, GenerationResult]
PrefillContext = Callable[[Sequence[GenerationRequest]], contextlib.AbstractContextManager[Any]]


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends an answer (the generation config's and the tokenizer's)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if not ids:
        raise ValueError("the model and tokenizer define no eos_token_id; generation could never stop")
    return {int(i) for i in ids}


@dataclass
class _Row:
    request: GenerationRequest
    adapter: str | None
    max_new: int  # the request's limit, capped by the context limit
    text: IncrementalDetokenizer
    cached: int  # real tokens of this row in the KV cache (= the next token's position)
    sampler: RowSampler
    last_token: int = -1
    finish: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def result(self) -> GenerationResult:
        self.text.finish()
        return GenerationResult(text=self.text.text, token_ids=list(self.text.tokens),
                                finish_reason=self.finish or "length", prompt_tokens=self.request.prompt.num_tokens,
                                logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs)


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [missing, 0]
    return F.pad(t, pad)


class DecodeBatch:
    """A running batch over one KV cache. Not thread-safe: one thread admits and steps.

    ``mixed_adapters``: rows run under ``per_sample_adapters`` with their request's adapter (False leaves the
    model's adapter state alone, e.g. a merged model). ``prefill_context(requests)`` is entered around each
    prefill forward (the serving engine routes each image to its adapter's projector there). Call ``close`` when
    done: it releases the adapter tables.
    """

    def __init__(self, model: Any, tokenizer: Any, *, mixed_adapters: bool,
                 prefill_context: PrefillContext | None = None) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; batched generation needs one")
        self.model = model
        self.tokenizer = tokenizer
        self.mixed_adapters = mixed_adapters
        self.prefill_context = prefill_context
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_ids = eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.dtype = model.dtype  # the base weights' dtype (adapter parameters may be kept in fp32)
        # transformers 5.25 renamed forward's past_key_values to cache (the old name warns, then goes in 5.40).
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length]: 1 = real token, 0 = left padding
        self._tables: contextlib.ExitStack | None = None
        self._tables_for: tuple[str | None, ...] | None = None

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def adapters(self) -> list[str | None]:
        return [row.adapter for row in self.rows]

    @property
    def cache_length(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    def close(self) -> None:
        self.release_adapters()
        self.rows, self._cache, self._mask = [], None, None

    def release_adapters(self) -> None:
        """Drop the gathered adapter tables (rebuilt at the next forward); needed before adapters change."""
        if self._tables is not None:
            self._tables.close()
        self._tables, self._tables_for = None, None

    def _use_adapters(self, names: Sequence[str | None]) -> None:
        if not self.mixed_adapters or self._tables_for == tuple(names):
            return
        from road_vlm.adapters import per_sample_adapters

        self.release_adapters()
        stack = contextlib.ExitStack()
        stack.enter_context(per_sample_adapters(self.model, list(names)))
        self._tables, self._tables_for = stack, tuple(names)

    # -- admission
    @torch.inference_mode()
    def admit(self, requests: Sequence[GenerationRequest]) -> list[Finished]:
        """Prefill ``requests`` (one forward) and add them to the batch; returns those already finished."""
        if not requests:
            return []
        length = max(r.prompt.num_tokens for r in requests)
        input_ids = torch.full((len(requests), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), length), dtype=torch.long)
        for i, request in enumerate(requests):
            ids = request.prompt.input_ids
            input_ids[i, length - len(ids):] = torch.tensor(ids, dtype=torch.long)  # left padding
            mask[i, length - len(ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # LLaVA fills image-token positions with image features in row-major order, so images go in row order.
        images = [r.prompt.pixel_values for r in requests if r.prompt.pixel_values is not None]
        pixel_values = torch.cat(images).to(self.device, self.dtype) if images else None

        self._use_adapters([r.adapter for r in requests])
        cache = DynamicCache(config=self.model.config)
        # Scoring a prompt needs the logits at every position; otherwise only the last one is computed.
        scoring = any(r.sampling.prompt_logprobs is not None for r in requests)
        with self.prefill_context(requests) if self.prefill_context else contextlib.nullcontext():
            out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=positions.to(self.device), pixel_values=pixel_values,
                             use_cache=True, logits_to_keep=0 if scoring else 1, **{self._cache_arg: cache})
        new_rows = [
            _Row(request=r, adapter=r.adapter,
                 max_new=min(r.sampling.max_new_tokens, r.prompt.context_limit - r.prompt.num_tokens),
                 text=IncrementalDetokenizer(self.tokenizer, r.on_text, r.sampling.stop),
                 cached=r.prompt.num_tokens,
                 sampler=RowSampler(r.sampling, r.prompt.input_ids, self.eos_ids, r.constraint),
                 logprobs=[] if r.sampling.logprobs is not None else None)
            for r in requests
        ]
        for i, row in enumerate(new_rows):
            top = row.request.sampling.prompt_logprobs
            if top is not None:
                ids = row.request.prompt.input_ids
                # Left padding: the row's tokens are the last len(ids) positions; position p predicts p + 1.
                scored = token_logprobs(out.logits[i, length - len(ids):-1], ids[1:], top)
                row.prompt_logprobs = [None, *scored]
        self._accept(new_rows, out.logits[:, -1, :])
        self._join(new_rows, cache, mask.to(self.device))
        return self._drop_finished()

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(f"continuous batching supports full-attention caches only, not "
                                          f"{type(layer).__name__}")
        if self._cache is None or self._mask is None:
            self.rows, self._cache, self._mask = rows, cache, mask
            return
        length = max(self.cache_length, mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length, -2), _left_pad(theirs.keys, length, -2)])
            mine.values = torch.cat([_left_pad(mine.values, length, -2), _left_pad(theirs.values, length, -2)])
        self._mask = torch.cat([_left_pad(self._mask, length, 1), _left_pad(mask, length, 1)])
        self.rows = self.rows + rows

    # -- decoding
    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """One decode step for every running row; returns the rows that finished (or were cancelled)."""
        for row in self.rows:
            if row.finish is None and row.request.cancelled.is_set():
                row.finish = "cancelled"
        finished = self._drop_finished()
        if not self.rows:
            return finished
        assert self._cache is not None and self._mask is not None
        self._use_adapters(self.adapters)
        input_ids = torch.tensor([[row.last_token] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.cached] for row in self.rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        out = self.model(input_ids=input_ids, attention_mask=self._mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: self._cache})
        for row in self.rows:
            row.cached += 1
        self._accept(self.rows, out.logits[:, -1, :])
        return finished + self._drop_finished()

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample one token per row and record it (EOS and limits end a row; a row allowed no new token ends
        before sampling)."""
        for row in rows:
            if row.max_new <= len(row.text.tokens):
                row.finish = "length"
        live = [i for i, row in enumerate(rows) if row.finish is None]
        if not live:
            return
        rows, logits = [rows[i] for i in live], logits[live].float()
        tokens = next_tokens([r.sampler for r in rows], logits)
        wanted = [i for i, r in enumerate(rows) if r.logprobs is not None]
        if wanted:
            counts = [rows[i].request.sampling.logprobs or 0 for i in wanted]
            entries = token_logprobs(logits[wanted], [tokens[i] for i in wanted], max(counts))
            for i, count, entry in zip(wanted, counts, entries):
                rows[i].logprobs.append(replace(entry, top=entry.top[:count]))
        for row, token in zip(rows, tokens):
            if row.request.cancelled.is_set():
                row.finish = "cancelled"
            elif token in self.eos_ids:
                row.finish = "stop"
            else:
                row.text.push(token)
                row.sampler.record(token)
                if row.request.on_token is not None:
                    row.request.on_token(token)
                row.last_token = token
                if row.text.stopped:
                    row.finish = "stop"
                elif len(row.text.tokens) >= row.max_new:
                    row.finish = "length"

    def _drop_finished(self) -> list[Finished]:
        done = [row for row in self.rows if row.finish is not None]
        if not done:
            return []
        keep = [i for i, row in enumerate(self.rows) if row.finish is None]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
        else:
            assert self._cache is not None and self._mask is not None
            index = torch.tensor(keep, device=self.device)
            mask = self._mask.index_select(0, index)
            first = int(mask.any(dim=0).nonzero()[0])  # columns before this are padding in every row left
            self._mask = mask[:, first:]
            for layer in self._cache.layers:
                layer.keys = layer.keys.index_select(0, index)[..., first:, :]
                layer.values = layer.values.index_select(0, index)[..., first:, :]
        return [(row.request, row.result()) for row in done]
