"""Prompt building and streamed, batched generation: the one generation path of eval, chat, web chat and serving.

A batch is a list of :class:`GenerationRequest` (prompt ids, optional image, adapter name or None, sampling
settings, an optional text callback). :func:`generate_batch` left-pads the prompts and runs ONE ``generate()``
call; when adapter names are given it wraps that call in the adapter engine's ``per_sample_adapters`` so every
row uses its own adapter in the same forward pass. Per-row sampling settings and per-row token limits are
handled by a logits processor and a stopping criterion, so requests with different settings still share a
batch, and a greedy row gives the same tokens in a batch as alone.

Text is streamed per row by :class:`_RowStreamer` (a transformers ``BaseStreamer`` that understands a batch),
which decodes each row incrementally and never emits half a UTF-8 character.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from road_vlm.data.images import preprocess_images
from road_vlm.data.template import TRAINING_ONLY_TEMPLATES, PromptFormat, encode_prompt
from road_vlm.model import num_image_tokens

TextCallback = Callable[[str], None]


class PromptTooLongError(ValueError):
    """A prompt that leaves no room in the model's context (or the checkpoint's max_length)."""


class SamplingError(ValueError):
    """Sampling settings that cannot be used."""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request: ``temperature`` 0 means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0):
            raise SamplingError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class PreparedPrompt:
    """Token ids of a prompt (image tokens expanded) and the image's pixel values, ready for a batch."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [1, 3, H, W] or None
    context_limit: int  # prompt + answer must fit in this many tokens

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


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
    finish_reason: str  # "stop" (EOS), "length" (token limit) or "cancelled"
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def context_limit(model: Any, prompt_format: PromptFormat) -> int:
    """How many tokens (prompt + answer) one sequence may hold: the smaller of training max_length and the
    language model's position limit."""
    text_config = getattr(model.config, "text_config", model.config)
    limit = prompt_format.max_length
    max_pos = getattr(text_config, "max_position_embeddings", None)
    if max_pos:
        limit = min(limit, int(max_pos))
    return limit


def _longest_token_chars(tokenizer: Any) -> int:
    """Characters in the longest vocabulary entry (cached on the tokenizer; byte pieces like <0x0A> count 6)."""
    cached = getattr(tokenizer, "_road_vlm_longest_token", None)
    if cached is None:
        cached = max(len(token) for token in tokenizer.get_vocab())
        tokenizer._road_vlm_longest_token = cached
    return cached


def prepare_prompt(
    model: Any,
    processor: Any,
    prompt_format: PromptFormat,
    history: Sequence[tuple[str, str]],
    question: str,
    image: Image.Image | None = None,
) -> PreparedPrompt:
    """Encode a conversation exactly as training did (vicuna_v1 template, pad/crop images per the checkpoint).

    Raises PromptTooLongError when the prompt leaves no room for a single answer token.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    if prompt_format.template in TRAINING_ONLY_TEMPLATES:
        raise ValueError(f"the {prompt_format.template!r} template is LLaVA's stage-1 captioning format, for training "
                         "only; chat, eval and serving use vicuna_v1 (build a stage-2 base from the stage-1 projector "
                         "with `road-vlm build-base --projector`)")
    tokenizer = processor.tokenizer
    n_image = num_image_tokens(processor)
    image_token_id = int(model.config.image_token_id)
    limit = context_limit(model, prompt_format)
    # Refuse what cannot fit before tokenising it: no token is longer than the longest vocabulary entry, so a text
    # of more than limit x that many characters has more than limit tokens (a 50 MB prompt is never tokenised).
    chars = len(question) + sum(len(user) + len(answer) for user, answer in history)
    if chars > limit * _longest_token_chars(tokenizer):
        raise PromptTooLongError(
            f"the conversation has {chars:,} characters, more than can fit in the context limit of {limit} tokens "
            f"(at most {_longest_token_chars(tokenizer)} characters per token); shorten it or start a new one"
        )
    ids = encode_prompt(
        tokenizer,
        list(history),
        question,
        has_image=image is not None,
        num_image_tokens=n_image,
        image_token_id=image_token_id,
    )
    if len(ids) >= limit:
        image_part = f" ({n_image} of them image tokens)" if image is not None else ""
        raise PromptTooLongError(
            f"the prompt is {len(ids)} tokens{image_part}, which leaves no room for an answer within the "
            f"context limit of {limit} tokens (min of the checkpoint's max_length {prompt_format.max_length} and "
            "the model's max_position_embeddings); shorten the conversation or start a new one"
        )
    pixel_values = None
    if image is not None:
        pixel_values = preprocess_images(processor.image_processor, [image], prompt_format.image_aspect_ratio)
    return PreparedPrompt(input_ids=ids, pixel_values=pixel_values, context_limit=limit)


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token (Llama / SentencePiece naming)


class _RowStreamer(BaseStreamer):
    """Receives ``generate()``'s token stream for a whole batch and turns it into per-row text pieces.

    transformers calls ``put`` once with the padded prompts ``[B, L]`` and then once per step with the new
    tokens ``[B]``. A row is finished at its first EOS token, at its token limit or when cancelled; tokens
    generate() appends to finished rows (padding) are ignored.

    Detokenisation is incremental, with a prefix and a read offset per row (as vLLM and TGI do): each step
    decodes only the window from the prefix offset, and emits what it adds beyond the already-read part, unless
    it ends in U+FFFD (a byte-fallback character still incomplete). Decoding a window rather than every token
    so far keeps earlier text fixed, so a stream never stalls on a changed prefix; the row's final text is the
    concatenation of its pieces, flushed at the end, so streamed and non-streamed text are the same string.
    """

    def __init__(self, tokenizer: Any, requests: Sequence[GenerationRequest], max_new: Sequence[int],
                 eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.requests = list(requests)
        self.max_new = list(max_new)
        self.eos_ids = eos_ids
        n = len(self.requests)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.pieces: list[list[str]] = [[] for _ in range(n)]
        self.prefix_offset = [0] * n  # where the decoding window starts
        self.read_offset = [0] * n  # tokens up to here are already emitted
        self.finish: list[str | None] = [None] * n
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # the first call carries the prompts
            self._seen_prompt = True
            return
        step = value.reshape(-1).tolist()
        for row, token in enumerate(step):
            if self.finish[row] is not None:
                continue
            if self.requests[row].cancelled.is_set():
                self.finish[row] = "cancelled"
                continue
            if token in self.eos_ids:
                self.finish[row] = "stop"
                continue
            self.tokens[row].append(int(token))
            self._emit(row, final=False)
            if len(self.tokens[row]) >= self.max_new[row]:
                self.finish[row] = "length"

    def end(self) -> None:
        for row in range(len(self.requests)):
            self._emit(row, final=True)
            if self.finish[row] is None:
                # generate() stopped without this row hitting EOS: the batch's overall max_new_tokens.
                self.finish[row] = "length"

    def text(self, row: int) -> str:
        return "".join(self.pieces[row])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _is_byte_piece(self, token_id: int) -> bool:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        return isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece) is not None

    def _emit(self, row: int, *, final: bool) -> None:
        tokens, start, read = self.tokens[row], self.prefix_offset[row], self.read_offset[row]
        if not final and self._is_byte_piece(tokens[-1]):
            # A run of byte-fallback tokens is decoded as one group, and one invalid byte turns the whole group
            # into U+FFFD: text from an open group may still change, so wait until a normal token closes it.
            return
        already = self._decode(tokens[start:read])
        window = self._decode(tokens[start:])
        if not final and (window.endswith("\ufffd") or len(window) <= len(already)):
            return  # an incomplete character, or nothing new yet (e.g. a lone space-marker token)
        # The window extends the read part, so its text extends the read text (with these decoders); were it not
        # to, emit only what differs from the common prefix rather than repeat or drop text.
        piece = window[len(os.path.commonprefix([already, window])):]
        self.prefix_offset[row], self.read_offset[row] = read, len(tokens)
        if not piece:
            return
        self.pieces[row].append(piece)
        callback = self.requests[row].on_text
        if callback is not None:
            callback(piece)


class _PerRowSampling(LogitsProcessor):
    """Temperature and nucleus (top-p) filtering with one setting per row; greedy rows become one-hot.

    generate() samples the whole batch or none of it; turning a greedy row's distribution into a one-hot on its
    argmax lets greedy and sampled requests share a batch while the greedy row keeps its exact answer.
    """

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float]) -> None:
        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self.top_ps = torch.tensor(top_ps, dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        temps = self.temperatures.to(scores.device)
        top_ps = self.top_ps.to(scores.device)
        greedy = temps == 0
        scaled = scores / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
        # Nucleus filtering: keep the smallest set of tokens whose probability mass reaches top_p (always >= 1).
        sorted_scores, order = torch.sort(scaled, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= top_ps[:, None]
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        filtered = scaled.masked_fill(remove, float("-inf"))
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot.scatter_(-1, scores.argmax(dim=-1, keepdim=True), 0.0)
        return torch.where(greedy[:, None], one_hot, filtered)


class _PerRowStop(StoppingCriteria):
    """Stops each row at its own token limit or when its request is cancelled (client went away)."""

    def __init__(self, prompt_length: int, max_new: Sequence[int], requests: Sequence[GenerationRequest]) -> None:
        self.prompt_length = prompt_length
        self.max_new = torch.tensor(max_new, dtype=torch.long)
        self.requests = list(requests)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        done = generated >= self.max_new.to(input_ids.device)
        cancelled = torch.tensor([r.cancelled.is_set() for r in self.requests], device=input_ids.device)
        return done | cancelled


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if not ids:
        raise ValueError("the model and tokenizer define no eos_token_id; generation could never stop")
    return {int(i) for i in ids}


def generate_batch(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    *,
    adapters: Sequence[str | None] | None = None,
) -> list[GenerationResult]:
    """Generate answers for all ``requests`` in one left-padded ``generate()`` call.

    ``adapters``: one adapter name (or None for the bare base) per row, applied in the same forward pass via
    ``per_sample_adapters``; ``None`` leaves the model's adapter state as it is (e.g. a merged model).
    """
    if not requests:
        return []
    if adapters is not None and len(adapters) != len(requests):
        raise ValueError(f"{len(adapters)} adapter names for {len(requests)} requests")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; batched generation needs one")
    device = next(model.parameters()).device
    dtype = model.dtype  # the base weights' dtype (adapter parameters may be kept in fp32)

    length = max(r.prompt.num_tokens for r in requests)
    input_ids = torch.full((len(requests), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(requests), length), dtype=torch.long)
    for row, request in enumerate(requests):
        ids = request.prompt.input_ids
        input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)  # left padding
        attention_mask[row, length - len(ids):] = 1
    # LLaVA fills image-token positions with image features in row-major order, so images go in row order.
    images = [r.prompt.pixel_values for r in requests if r.prompt.pixel_values is not None]

    # Each row may generate up to its own limit, and never beyond the context limit.
    max_new = [
        min(r.sampling.max_new_tokens, r.prompt.context_limit - r.prompt.num_tokens) for r in requests
    ]
    eos_ids = _eos_ids(model, tokenizer)
    streamer = _RowStreamer(tokenizer, requests, max_new, eos_ids)
    sampling = [r.sampling for r in requests]
    do_sample = any(not s.greedy for s in sampling)
    kwargs: dict[str, Any] = {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "max_new_tokens": max(max_new),
        "do_sample": do_sample,
        "streamer": streamer,
        "stopping_criteria": StoppingCriteriaList([_PerRowStop(length, max_new, requests)]),
        "pad_token_id": pad_id,
        "eos_token_id": sorted(eos_ids),
        # Our own processor does temperature/top-p per row; keep generate()'s global warpers off.
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    if do_sample:
        kwargs["logits_processor"] = LogitsProcessorList(
            [_PerRowSampling([s.temperature for s in sampling], [s.top_p for s in sampling])]
        )
    if images:
        kwargs["pixel_values"] = torch.cat(images, dim=0).to(device=device, dtype=dtype)

    with torch.inference_mode():
        if adapters is None:
            model.generate(**kwargs)
        else:
            from road_vlm.adapters import per_sample_adapters

            with per_sample_adapters(model, list(adapters)):
                model.generate(**kwargs)

    results = []
    for row, request in enumerate(requests):
        results.append(
            GenerationResult(
                text=streamer.text(row),
                token_ids=list(streamer.tokens[row]),
                finish_reason=streamer.finish[row] or "length",
                prompt_tokens=request.prompt.num_tokens,
            )
        )
    return results


class StreamedGeneration:
    """Runs one :func:`generate_batch` call in a background thread and yields the text of one row as it comes.

    Iterate to receive text pieces; afterwards ``result`` holds the :class:`GenerationResult`. An exception in
    the generating thread is re-raised by the iterator.
    """

    _DONE = object()

    def __init__(self, model: Any, tokenizer: Any, request: GenerationRequest,
                 adapters: Sequence[str | None] | None = None) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self.result: GenerationResult | None = None
        self._error: BaseException | None = None
        user_callback = request.on_text

        def on_text(piece: str) -> None:
            if user_callback is not None:
                user_callback(piece)
            self._queue.put(piece)

        request.on_text = on_text
        self._thread = threading.Thread(
            target=self._run, args=(model, tokenizer, request, adapters), name="road-vlm-generate", daemon=True
        )
        self._thread.start()

    def _run(self, model: Any, tokenizer: Any, request: GenerationRequest,
             adapters: Sequence[str | None] | None) -> None:
        try:
            (self.result,) = generate_batch(model, tokenizer, [request], adapters=adapters)
        except BaseException as err:  # re-raised in the consuming thread
            self._error = err
        finally:
            self._queue.put(self._DONE)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                break
            yield item
        self._thread.join()
        if self._error is not None:
            raise self._error
