"""LLaVA-1.5's conversation templates and exact label construction: ``v1`` (``conv_vicuna_v1``, stage 2, chat,
eval and serving) and ``plain`` (``conv_llava_plain``, stage-1 caption pretraining; training only).

Prompt string (see shared/reference/llava15.md, 2.3)::

    <SYSTEM> USER: <image>\\n<q1> ASSISTANT: <a1></s>USER: <q2> ASSISTANT: <a2></s>

Labels are derived from the tokenizer's character offsets of that one string: a token is supervised when it
overlaps an answer span (the space after ``ASSISTANT:``, the answer, and its closing ``</s>``). LLaVA instead
re-tokenises each round and applies +-1 corrections that depend on the tokenizer version; when they are wrong it
masks the whole sample with a "tokenization mismatch" warning and the loss silently becomes 0. Offsets cannot
drift, and a sample that still ends up with no supervised token raises ``LabelingError``.

``plain`` (LLaVA's ``preprocess_plain``)::

    <image><caption>\n

one human/gpt pair whose human text is dropped (only the image is kept), no system prompt, no roles, no ``</s>``;
the caption and the newline (the template's separator) are supervised.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from road_vlm.filenames import PROMPT_FORMAT

SYSTEM_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
Template = Literal["vicuna_v1", "plain"]
TEMPLATES: tuple[str, ...] = get_args(Template)
TRAINING_ONLY_TEMPLATES = ("plain",)
ImageAspectRatio = Literal["pad", "crop"]  # pad: LLaVA-1.5's expand2square; crop: the bare CLIP processor
IMAGE_ASPECT_RATIOS: tuple[str, ...] = get_args(ImageAspectRatio)


class LabelingError(ValueError):
    """A conversation that cannot be turned into a supervised training sample."""


@dataclass(frozen=True)
class PromptFormat:
    """How prompts and images were built in training; saved with every checkpoint and reused at inference."""

    template: str = "vicuna_v1"
    image_aspect_ratio: str = "pad"
    max_length: int = 2048

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown conversation template {self.template!r}; known: {', '.join(TEMPLATES)}")
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(
                f"unknown image_aspect_ratio {self.image_aspect_ratio!r}; known: {', '.join(IMAGE_ASPECT_RATIOS)}"
            )
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PROMPT_FORMAT
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> PromptFormat | None:
        """The format saved in ``directory``, or None when the directory has none."""
        path = Path(directory) / PROMPT_FORMAT
        if not path.is_file():
            return None
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            return cls(**data)
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: invalid prompt format: {err}") from err


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # text tokens were cut at max_length (image tokens never are)
    extra: dict[str, Any] = field(default_factory=dict)


def _move_image_to_front(text: str) -> str:
    # LLaVA's preprocess_multimodal: wherever <image> stood in the turn, it ends up first, then a newline.
    return IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()


def render_turns(turns: list[tuple[str, str | None]], system: str = SYSTEM_V1) -> tuple[str, list[tuple[int, int]]]:
    """Render (user, assistant) turns; assistant None marks the generation slot (must be last). ``system`` fills
    the template's system slot (an empty one leaves it out).

    Returns the prompt string and the character spans to supervise.
    """
    text = system + " " if system else ""
    spans: list[tuple[int, int]] = []
    for i, (user, assistant) in enumerate(turns):
        text += f"{ROLES[0]}: {user} {ROLES[1]}:"
        if assistant is None:
            if i != len(turns) - 1:
                raise ValueError("only the last turn may be left open for generation")
            break
        start = len(text)
        text += " " + assistant + "</s>"
        spans.append((start, len(text)))
    return text, spans


def render_prompt(history: list[tuple[str, str]], question: str, *, has_image: bool, system: str | None = None) -> str:
    """The generation prompt, ending with ``ASSISTANT:``; the image (if any) opens the first user turn; ``system``
    replaces the template's system text (None keeps LLaVA-1.5's)."""
    turns: list[tuple[str, str | None]] = [(u, a) for u, a in history] + [(question, None)]
    if has_image:
        first_user = turns[0][0]
        turns[0] = (_move_image_to_front(first_user), turns[0][1])
    text, _ = render_turns(turns, SYSTEM_V1 if system is None else system)
    return text


def _tokenize_with_images(
    tokenizer: Any, text: str, *, num_image_tokens: int, image_token_id: int, spans: list[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    """Token ids with each ``<image>`` expanded to ``num_image_tokens`` ids, and which tokens are supervised: a
    non-empty token is supervised when its characters overlap an answer span. Vectorised (the start-up
    tokenisation of 665k samples spends its time here): ``spans`` are sorted and disjoint, so the only span a
    token can overlap is the first one ending after the token's start."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if len(offsets) != len(ids):  # pragma: no cover - tokenizer contract
        raise LabelingError("tokenizer returned offsets that do not match its tokens")
    starts, ends = offsets[:, 0], offsets[:, 1]
    supervised = np.zeros(len(ids), dtype=bool)
    if spans:
        span = np.asarray(spans, dtype=np.int64)
        if np.any(span[1:, 0] < span[:-1, 1]):  # pragma: no cover - render_turns writes them in order
            raise LabelingError("answer spans overlap or are out of order")
        first = np.searchsorted(span[:, 1], starts, side="right")
        inside = first < len(span)
        supervised[inside] = span[first[inside], 0] < ends[inside]
        supervised &= ends > starts
    is_image = ids == image_token_id
    if is_image.any():
        repeats = np.where(is_image, num_image_tokens, 1)
        ids, supervised = np.repeat(ids, repeats), np.repeat(supervised & ~is_image, repeats)
    return ids.tolist(), supervised.tolist()


def _check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "road_vlm derives labels from character offsets and needs a fast (tokenizers-backed) tokenizer; "
            f"got {type(tokenizer).__name__}"
        )


def conversation_to_turns(conversations: list[dict[str, Any]], *, has_image: bool) -> list[tuple[str, str]]:
    """Validate LLaVA ``conversations`` (human/gpt alternating, ``<image>`` only in the first human turn)."""
    if not isinstance(conversations, list) or not conversations:
        raise LabelingError("'conversations' must be a non-empty list of turns")
    turns: list[tuple[str, str]] = []
    expected = ("human", "gpt")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise LabelingError(f"turn {i} must be an object with 'from' and 'value'")
        if turn["from"] != expected[i % 2]:
            raise LabelingError(
                f"turn {i} is from {turn['from']!r}, expected {expected[i % 2]!r} (turns must alternate human/gpt, "
                "starting with human)"
            )
        if not isinstance(turn["value"], str):
            raise LabelingError(f"turn {i} value must be a string")
    if len(conversations) % 2:
        raise LabelingError("the conversation ends with a human turn that has no gpt answer")
    image_turns = [i for i, t in enumerate(conversations) if IMAGE_TOKEN in t["value"]]
    if has_image:
        if image_turns != [0] or conversations[0]["value"].count(IMAGE_TOKEN) != 1:
            raise LabelingError(
                "the sample has an image, so the first human turn must contain '<image>' exactly once and no other "
                f"turn may contain it (found it in turns {image_turns})"
            )
    elif image_turns:
        raise LabelingError(f"'<image>' appears in turns {image_turns} but the sample has no 'image' field")
    for i in range(0, len(conversations), 2):
        user = conversations[i]["value"]
        if i == 0 and has_image:
            user = _move_image_to_front(user)
        turns.append((user, conversations[i + 1]["value"]))
    return turns


def render_plain(conversations: list[dict[str, Any]], *, has_image: bool) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA's ``plain`` stage-1 sample: the image, then the caption and the separator (supervised)."""
    turns = conversation_to_turns(conversations, has_image=has_image)
    if not has_image or len(turns) != 1:
        raise LabelingError("the plain template (stage-1 captions) needs exactly one human/gpt pair with an image "
                            f"(got {len(turns)} pair(s), {'an' if has_image else 'no'} image)")
    text = IMAGE_TOKEN + turns[0][1] + "\n"
    return text, [(len(IMAGE_TOKEN), len(text))]


def render_training_sample(
    conversations: list[dict[str, Any]], *, has_image: bool, template: str = "vicuna_v1"
) -> tuple[str, list[tuple[int, int]]]:
    """The training text of one LLaVA conversation and the character spans to supervise (no tokenising: cheap
    enough to validate a 665k-record file up front). Raises LabelingError for a conversation the template cannot
    render."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; known: {', '.join(TEMPLATES)}")
    if template == "plain":
        return render_plain(conversations, has_image=has_image)
    return render_turns(list(conversation_to_turns(conversations, has_image=has_image)))


def image_tokens_end(tokenizer: Any, *, num_image_tokens: int, image_token_id: int, template: str = "vicuna_v1") -> int:
    """Where the image tokens of a training sample end. The same for every sample: the image opens the first
    user turn (``vicuna_v1``, after the system prompt) or the sample (``plain``), and ``<image>`` is a special
    token, so nothing after it changes the tokens before it."""
    probe = [{"from": "human", "value": IMAGE_TOKEN + "\n?"}, {"from": "gpt", "value": "."}]
    text, spans = render_training_sample(probe, has_image=True, template=template)
    ids, _ = _tokenize_with_images(tokenizer, text, num_image_tokens=num_image_tokens, image_token_id=image_token_id,
                                   spans=spans)
    return max(i for i, t in enumerate(ids) if t == image_token_id) + 1


def encode_training_sample(
    tokenizer: Any,
    conversations: list[dict[str, Any]],
    *,
    has_image: bool,
    num_image_tokens: int,
    image_token_id: int,
    max_length: int,
    template: str = "vicuna_v1",
    require_supervised: bool = True,
) -> EncodedSample:
    """Token ids and labels for one LLaVA conversation (answers and their ``</s>`` supervised; ``plain``: the
    caption and its newline). ``require_supervised=False``: a sample whose every answer token was truncated away
    is returned (all labels ignored) instead of raising."""
    _check_tokenizer(tokenizer)
    text, spans = render_training_sample(conversations, has_image=has_image, template=template)
    ids, supervised = _tokenize_with_images(
        tokenizer, text, num_image_tokens=num_image_tokens, image_token_id=image_token_id, spans=spans
    )
    truncated = False
    if len(ids) > max_length:
        if has_image:
            last_image = max(i for i, t in enumerate(ids) if t == image_token_id)
            if last_image >= max_length:
                raise LabelingError(
                    f"the image tokens end at position {last_image + 1}, beyond max_length {max_length}"
                )
        ids, supervised = ids[:max_length], supervised[:max_length]
        truncated = True
    labels = [t if s else IGNORE_INDEX for t, s in zip(ids, supervised)]
    if require_supervised and all(label == IGNORE_INDEX for label in labels):
        raise LabelingError("no answer token left to supervise" + (" after truncation" if truncated else ""))
    return EncodedSample(input_ids=ids, labels=labels, truncated=truncated)


def encode_prompt(
    tokenizer: Any,
    history: list[tuple[str, str]],
    question: str,
    *,
    has_image: bool,
    num_image_tokens: int,
    image_token_id: int,
    system: str | None = None,
) -> list[int]:
    """Token ids of a generation prompt, built exactly as the training samples were (``system``: see
    :func:`render_prompt`)."""
    _check_tokenizer(tokenizer)
    if IMAGE_TOKEN in question and (history or not has_image):
        raise ValueError("'<image>' may only appear in the first user message of a conversation with an image")
    text = render_prompt(history, question, has_image=has_image, system=system)
    ids, _ = _tokenize_with_images(
        tokenizer, text, num_image_tokens=num_image_tokens, image_token_id=image_token_id, spans=[]
    )
    return ids
