"""Prompts for generation: a conversation encoded exactly as training encoded it, checked against the context."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from road_vlm.data.images import preprocess_images
from road_vlm.data.template import IMAGE_TOKEN, TRAINING_ONLY_TEMPLATES, PromptFormat, encode_prompt
from road_vlm.model import num_image_tokens


class PromptTooLongError(ValueError):
    """A prompt that leaves no room in the model's context (or the checkpoint's max_length)."""


@dataclass
class PreparedPrompt:
    """Token ids of a prompt (image tokens expanded) and the image's pixel values, ready for a batch."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [1, 3, H, W] or None
    context_limit: int  # prompt + answer must fit in this many tokens

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


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
    system: str | None = None,
) -> PreparedPrompt:
    """Encode a conversation exactly as training did (vicuna_v1 template, pad/crop images per the checkpoint);
    ``system`` replaces the template's system text (None: LLaVA-1.5's own).

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
    chars = len(question) + len(system or "") + sum(len(user) + len(answer) for user, answer in history)
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
        system=system,
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


def prepare_raw_prompt(model: Any, tokenizer: Any, prompt_format: PromptFormat, prompt: str | Sequence[int],
                       ) -> PreparedPrompt:
    """A prompt without the chat template (OpenAI's completions): a text, tokenised as the tokenizer does (BOS
    first), or token ids, used exactly as given. Text only: image tokens are refused (they need an image).

    Raises PromptTooLongError when the prompt leaves no room for a single answer token.
    """
    limit = context_limit(model, prompt_format)
    image_token_id = int(model.config.image_token_id)
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) > limit * _longest_token_chars(tokenizer):
            raise PromptTooLongError(f"the prompt has {len(prompt):,} characters, more than can fit in the context "
                                     f"limit of {limit} tokens")
        if IMAGE_TOKEN in prompt:
            raise ValueError(f"the prompt may not contain {IMAGE_TOKEN!r} (completions take no images)")
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    else:
        ids = [int(t) for t in prompt]
        vocab = int(getattr(model.config, "text_config", model.config).vocab_size)
        bad = [t for t in ids if not 0 <= t < vocab or t == image_token_id]
        if bad:
            raise ValueError(f"token id {bad[0]} is not a text token of this model (vocabulary size {vocab}, image "
                             f"token {image_token_id})")
    if len(ids) >= limit:
        raise PromptTooLongError(f"the prompt is {len(ids)} tokens, which leaves no room for an answer within the "
                                 f"context limit of {limit} tokens")
    return PreparedPrompt(input_ids=ids, pixel_values=None, context_limit=limit)
