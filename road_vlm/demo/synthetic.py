"""Deterministic synthetic data: shape images, instruction data and the four eval layouts.

Everything here is seeded and uses a deliberately tiny vocabulary so that a tiny LLaVA
(36 image tokens of the demo's 48x48 resize, a BPE tokenizer trained on `tokenizer_corpus()`) can
learn the tasks in minutes on a CPU. The eval files are written in exactly the layout of
LLaVA-1.5's ``playground/data/eval`` so the real benchmark loaders read them unchanged.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, ImageDraw, ImageFont

# --------------------------------------------------------------------------------------
# Vocabulary (kept small on purpose: the tiny tokenizer is trained on tokenizer_corpus()).
# --------------------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# ScienceQA-style colour questions list one of these option sets, always in this order.
COLOR_OPTION_SETS: tuple[tuple[str, ...], ...] = (("red", "green", "blue"), ("yellow", "purple", "orange"))
# A non-uniform prior makes POPE's "popular" negatives (most frequent objects) differ from
# "random" ones, as they do on COCO.
SHAPE_WEIGHTS: tuple[float, ...] = (0.3, 0.25, 0.2, 0.15, 0.1)
WORDS: tuple[str, ...] = ("stop", "exit", "open", "taxi", "bus", "cafe", "park", "hotel", "bank", "sale")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two"}
BACKGROUND = (255, 255, 255)
TEXT_BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "yellow": (235, 215, 20)}

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
OCR_PREFIX = "Reference OCR token: "
CAPTION_PROMPT = "Describe the image briefly."
OPTION_LETTERS = ("A", "B", "C", "D", "E")
POPE_CATEGORIES: tuple[str, ...] = ("adversarial", "popular", "random")
# Sidecar (not part of any benchmark layout): image path relative to root -> its spec, so
# tests can check every answer against the ground truth that produced the image.
SPECS_FILE = "synthetic_specs.json"

# Text-only knowledge used by ScienceQA-style text questions and text-only training samples.
SHAPE_FACTS: dict[str, str] = {
    "circle": "A circle is round and has no corners.",
    "square": "A square has four equal sides.",
    "triangle": "A triangle has three sides.",
    "diamond": "A diamond looks like a square turned on its corner.",
    "cross": "A cross is made of two crossing bars.",
}
SHAPE_RIDDLES: dict[str, str] = {
    "circle": "Which shape is round and has no corners?",
    "square": "Which shape has four equal sides?",
    "triangle": "Which shape has three sides?",
    "diamond": "Which shape looks like a square turned on its corner?",
    "cross": "Which shape is made of two crossing bars?",
}
# The instruction mix (family -> share of instruct.json) and the benchmark formats of the text-only scene
# questions the tiny base is pretrained on. ScienceQA's multiple-choice format is left to the instruction data, as
# a real stage-1 LLaVA has not met "Answer with the option's letter" either.
INSTRUCT_FAMILIES: dict[str, float] = {"gqa": 0.3, "pope": 0.33, "sqa_img": 0.08, "sqa_text": 0.07, "textvqa": 0.17,
                                       "text": 0.05}
SCENE_FAMILIES: tuple[str, ...] = ("gqa", "pope")
TEXT_ONLY_QA: tuple[tuple[str, str], ...] = tuple(
    [(f"Is {c} a color or a shape?", "a color") for c in COLORS]
    + [(f"Is a {s} a color or a shape?", "a shape") for s in SHAPES]
    + [(SHAPE_RIDDLES[s], f"A {s}.") for s in SHAPES]
    + [("How many sides does a triangle have?", "three"), ("How many sides does a square have?", "four")]
)


# --------------------------------------------------------------------------------------
# Image specs and rendering
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """One coloured shape; position is "center", "left" or "right"."""

    shape: str
    color: str
    position: str


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to render an image and to derive correct answers from it."""

    width: int
    height: int
    shapes: tuple[ShapeSpec, ...] = ()
    word: str | None = None
    sign_color: str = "white"
    jitter: tuple[int, int] = (0, 0)

    def shape_names(self) -> set[str]:
        return {s.shape for s in self.shapes}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        bar = max(2, (x1 - x0) // 3)
        draw.rectangle((cx - bar / 2, y0, cx + bar / 2, y1), fill=fill)
        draw.rectangle((x0, cy - bar / 2, x1, cy + bar / 2), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_image(spec: ImageSpec) -> Image.Image:
    """Render an ImageSpec to an RGB PIL image (pure function of the spec)."""
    if spec.word is not None:
        image = Image.new("RGB", (spec.width, spec.height), (90, 90, 90))
        draw = ImageDraw.Draw(image)
        margin = 3
        draw.rectangle((margin, margin, spec.width - 1 - margin, spec.height - 1 - margin), fill=TEXT_BACKGROUNDS[spec.sign_color])
        font = ImageFont.load_default(size=spec.height // 2)  # large: readable after the 32-48 px resize
        left, top, right, bottom = draw.textbbox((0, 0), spec.word, font=font)
        x = (spec.width - (right - left)) / 2 - left + spec.jitter[0]
        y = (spec.height - (bottom - top)) / 2 - top + spec.jitter[1]
        draw.text((x, y), spec.word, fill=(0, 0, 0), font=font)
        return image
    image = Image.new("RGB", (spec.width, spec.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    n = len(spec.shapes)
    for item in spec.shapes:
        if n == 1:
            side = int(min(spec.width, spec.height) * 0.6)
            cx, cy = spec.width / 2, spec.height / 2
        else:  # on the diagonal (top left, bottom right): about twice the area they would have side by side
            side = int(min(spec.width, spec.height) * 0.48)
            cx = spec.width * (0.26 if item.position == "left" else 0.74)
            cy = spec.height * (0.27 if item.position == "left" else 0.73)
        cx += spec.jitter[0]
        cy += spec.jitter[1]
        box = (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
        _draw_shape(draw, item.shape, box, COLORS[item.color])
    return image


_SIZES_ONE = ((48, 48), (64, 40), (40, 64))
_SIZES_TWO = ((48, 48),)  # square: a wide image would shrink both shapes when padded to a square


def _weighted_shape(rng: random.Random, exclude: Iterable[str] = ()) -> str:
    excluded = set(exclude)
    pool = [(s, w) for s, w in zip(SHAPES, SHAPE_WEIGHTS) if s not in excluded]
    return rng.choices([s for s, _ in pool], weights=[w for _, w in pool])[0]


def random_shape_spec(rng: random.Random, num_shapes: int | None = None) -> ImageSpec:
    """One or two shapes (distinct shape names) on a plain background."""
    n = num_shapes if num_shapes is not None else rng.choice((1, 1, 2))
    if n == 1:
        w, h = rng.choice(_SIZES_ONE)
        shapes = (ShapeSpec(_weighted_shape(rng), rng.choice(list(COLORS)), "center"),)
    else:
        w, h = rng.choice(_SIZES_TWO)
        first = _weighted_shape(rng)
        second = _weighted_shape(rng, exclude=[first])
        c1, c2 = rng.sample(list(COLORS), 2)
        shapes = (ShapeSpec(first, c1, "left"), ShapeSpec(second, c2, "right"))
    return ImageSpec(w, h, shapes, jitter=(rng.randint(-2, 2), rng.randint(-2, 2)))


def random_word_spec(rng: random.Random) -> ImageSpec:
    """A sign with one short rendered word (TextVQA-style)."""
    return ImageSpec(64, 40, (), word=rng.choice(WORDS), sign_color=rng.choice(list(TEXT_BACKGROUNDS)),
                     jitter=(rng.randint(-2, 2), rng.randint(-1, 1)))


# --------------------------------------------------------------------------------------
# Question families. Each returns (question_text_without_suffix, answer) derived from the spec.
# --------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: ImageSpec) -> str:
    """A short caption that names every object in the image."""
    if spec.word is not None:
        return f"A {spec.sign_color} sign that says {spec.word}."
    if len(spec.shapes) == 1:
        s = spec.shapes[0]
        return f"{_article(s.color).capitalize()} {s.color} {s.shape}."
    a, b = spec.shapes
    return (f"{_article(a.color).capitalize()} {a.color} {a.shape} on the left and {_article(b.color)} {b.color} "
            f"{b.shape} on the right.")


def gqa_question(spec: ImageSpec, rng: random.Random) -> tuple[str, str]:
    """A GQA-style short-answer question about colours, shapes, count or position."""
    shapes = spec.shapes
    target = rng.choice(shapes)
    kinds = ["color_of_shape", "shape_of_color", "count", "is_color"]
    if len(shapes) == 1:
        kinds += ["what_shape", "what_color"]
    else:
        kinds += ["left_right_shape", "which_side"]
    kind = rng.choice(kinds)
    if kind == "color_of_shape":
        return f"What color is the {target.shape}?", target.color
    if kind == "shape_of_color":
        return f"What shape is the {target.color} object?", target.shape
    if kind == "count":
        return "How many shapes are there?", NUMBER_WORDS[len(shapes)]
    if kind == "is_color":
        return color_check_question(spec, rng)
    if kind == "what_shape":
        return "What shape is it?", target.shape
    if kind == "what_color":
        return "What color is the shape?", target.color
    if kind == "left_right_shape":
        return f"What shape is on the {target.position}?", target.shape
    # which_side
    return f"Is the {target.shape} on the left or on the right?", target.position


def color_check_question(spec: ImageSpec, rng: random.Random) -> tuple[str, str]:
    """GQA's yes/no colour check about one of the shapes ("Is the circle red?"), "yes" half of the time."""
    target = rng.choice(spec.shapes)
    asked = rng.choice([target.color, rng.choice([c for c in COLORS if c != target.color])])
    return f"Is the {target.shape} {asked}?", "yes" if asked == target.color else "no"


def pope_negative(spec: ImageSpec, category: str, rng: random.Random,
                  frequency: dict[str, int], cooccurrence: dict[tuple[str, str], int]) -> str:
    """POPE negative sampling: an absent shape chosen at random, by global frequency
    ("popular") or by co-occurrence with the present shapes ("adversarial")."""
    present = spec.shape_names()
    absent = [s for s in SHAPES if s not in present]
    if category == "random":
        return rng.choice(absent)
    if category == "popular":
        return max(absent, key=lambda s: (frequency.get(s, 0), -SHAPES.index(s)))
    if category == "adversarial":
        return max(absent, key=lambda s: (sum(cooccurrence.get((p, s), 0) for p in present), -SHAPES.index(s)))
    raise ValueError(f"unknown POPE category {category!r}; expected one of {POPE_CATEGORIES}")


def pope_question(shape: str) -> str:
    return f"Is there a {shape} in the image?"


def pope_training_question(rng: random.Random) -> tuple[ImageSpec, str, str]:
    """A POPE-style training sample (image, asked shape, answer) in which neither the asked shape nor the number of
    shapes tells the answer: shape drawn uniformly, yes/no by a coin, then an image with a drawn number of shapes
    that agrees. Asking about a present shape for "yes" would make frequent shapes (which POPE's popular negatives
    ask about) and two-shape images mean "yes"."""
    shape, answer, num_shapes = rng.choice(SHAPES), rng.choice(("yes", "no")), rng.choice((1, 1, 2))
    while True:
        spec = random_shape_spec(rng, num_shapes=num_shapes)
        if (shape in spec.shape_names()) == (answer == "yes"):
            return spec, shape, answer


def _options_line(choices: list[str]) -> str:
    return " ".join(f"({OPTION_LETTERS[i]}) {c}" for i, c in enumerate(choices))


def sqa_text(context: str, question: str, choices: list[str]) -> str:
    """ScienceQA's CQM-A human turn (as in LLaVA's convert_sqa_to_llava)."""
    return f"Context: {context}\nQuestion: {question}\nOptions: {_options_line(choices)}"


def sqa_image_problem(spec: ImageSpec, rng: random.Random) -> tuple[str, str, list[str], int]:
    """(hint, question, choices, answer_index): the colour of one of the image's shapes.

    The options are a fixed list in a fixed order (``COLOR_OPTION_SETS``: the one holding the right colour), like
    ScienceQA's templated questions ("Which tense does the sentence use? (A) past (B) present (C) future"). So the
    question is answerable from colour, the property the tiny base sees reliably; the letter format is taught by the
    instruction data alone. The benchmark and training data ask it about one-shape images, so no other colour in
    the picture can be an option.
    """
    target = rng.choice(spec.shapes)
    choices = list(next(options for options in COLOR_OPTION_SETS if target.color in options))
    hint = rng.choice(("", "Look at the picture."))
    return hint, f"Which color is the {target.shape}?", choices, choices.index(target.color)


def sqa_text_problem(rng: random.Random) -> tuple[str, str, list[str], int]:
    """A text-only multiple-choice question answerable from its context."""
    target = rng.choice(SHAPES)
    wrong = rng.sample([s for s in SHAPES if s != target], rng.choice((1, 2, 3)))
    choices = wrong + [target]
    rng.shuffle(choices)
    return SHAPE_FACTS[target], SHAPE_RIDDLES[target], choices, choices.index(target)


TEXTVQA_QUESTIONS = ("What word is written on the sign?", "What does the sign say?", "What is written in the image?")


def textvqa_question(spec: ImageSpec, rng: random.Random, question: str | None = None) -> tuple[str, str]:
    """TextVQA-style question text (question + OCR line, without suffix) and the answer.

    Like real OCR output the reference line holds more than the answer (here: the word plus two distractors,
    shuffled), so copying from the prompt alone is right a third of the time; the image decides.
    """
    assert spec.word is not None
    question = question or rng.choice(TEXTVQA_QUESTIONS)
    tokens = [spec.word] + rng.sample([w for w in WORDS if w != spec.word], 2)
    rng.shuffle(tokens)
    return f"{question}\n{OCR_PREFIX}{', '.join(tokens)}", spec.word


def scene_prompt(spec: ImageSpec, question: str) -> str:
    """A short-answer question about ``spec`` given in words: the text-only twin of an image question."""
    return f"Scene: {caption(spec)}\n{question}\n{SHORT_ANSWER_SUFFIX}"


def scene_question(spec: ImageSpec, rng: random.Random) -> tuple[str, str]:
    """A text-only question in GQA's, POPE's or TextVQA's format about ``spec`` given as a caption.

    The tiny base learns from these what a base LLM already knows (answer formats, reading a described
    scene); RoAd tuning then has to teach it to answer the same questions from the image instead.
    """
    if spec.word is not None:
        q, a = textvqa_question(spec, rng)
        return scene_prompt(spec, q), a
    family = rng.choice(SCENE_FAMILIES)
    if family == "gqa":
        q, a = gqa_question(spec, rng)
        return scene_prompt(spec, q), a
    # pope: any shape, present or not (the asked shape must not give the answer away)
    shape = rng.choice(SHAPES)
    answer = "yes" if shape in spec.shape_names() else "no"
    return scene_prompt(spec, pope_question(shape)), answer


# --------------------------------------------------------------------------------------
# Tokenizer corpus
# --------------------------------------------------------------------------------------


def tokenizer_corpus() -> list[str]:
    """Sentences covering every word, question, answer and suffix the generators can emit.

    The lead's tiny tokenizer is trained on this (plus the v1 system prompt), so every
    synthetic sample tokenizes into whole words rather than byte fallbacks.
    """
    lines: list[str] = [SHORT_ANSWER_SUFFIX, MC_SUFFIX, OCR_PREFIX.strip(), CAPTION_PROMPT, "Context: N/A", "Scene:"]
    lines += [f"The answer is {letter}." for letter in OPTION_LETTERS]
    lines += list(OPTION_LETTERS) + [f"({letter})" for letter in OPTION_LETTERS]
    lines += ["yes", "no", "Yes", "No", "left", "right", "one", "two", "three", "four", "Look at the picture."]
    lines += list(COLORS) + list(SHAPES) + list(WORDS) + [w.upper() for w in WORDS]
    lines += [f"the {w}" for w in WORDS] + [f"{w} sign" for w in WORDS]
    for color in COLORS:
        for shape in SHAPES:
            lines += [
                f"A {color} {shape}.",
                f"{_article(color).capitalize()} {color} {shape} on the left and {_article(color)} {color} {shape}.",
                f"What color is the {shape}?",
                f"What shape is the {color} object?",
                f"Is the {shape} {color}?",
                f"Which color is the {shape}?",
                f"A {color} {shape} on the left and a {color} {shape} on the right.",
            ]
    for shape in SHAPES:
        lines += [pope_question(shape), f"What shape is on the left? {shape}", f"What shape is on the right? {shape}",
                  f"Is the {shape} on the left or on the right?", SHAPE_FACTS[shape], SHAPE_RIDDLES[shape]]
    lines += ["How many shapes are there?", "What shape is it?", "What color is the shape?"]
    lines += ["What word is written on the sign?", "What does the sign say?", "What is written in the image?"]
    for sign in TEXT_BACKGROUNDS:
        for word in WORDS:
            lines += [f"A {sign} sign that says {word}.", f"{OCR_PREFIX}{word}"]
    for question, answer in TEXT_ONLY_QA:
        lines += [question, answer]
    lines += [sqa_text("Look at the picture.", "Which color is the circle?", list(options))
              for options in COLOR_OPTION_SETS]
    # Deduplicate while keeping a stable order (determinism for tokenizer training).
    return list(dict.fromkeys(lines))


# --------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _spec_record(spec: ImageSpec) -> dict[str, Any]:
    return asdict(spec)


def load_specs(root: str | Path) -> dict[str, ImageSpec]:
    """Read ``root/synthetic_specs.json`` (image path relative to root -> ImageSpec)."""
    raw = json.loads((Path(root) / SPECS_FILE).read_text(encoding="utf-8"))
    return {path: ImageSpec(width=r["width"], height=r["height"],
                            shapes=tuple(ShapeSpec(**s) for s in r["shapes"]), word=r["word"],
                            sign_color=r["sign_color"], jitter=tuple(r["jitter"]))
            for path, r in raw.items()}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _human(text: str, has_image: bool) -> dict[str, str]:
    return {"from": "human", "value": f"<image>\n{text}" if has_image else text}


def _gpt(text: str) -> dict[str, str]:
    return {"from": "gpt", "value": text}


# The language model's pretraining mix, one slot per sample in turn. Text is cheap (no image), so the language model
# gets five times as many samples as the captioning phase. Yes/no questions need the most: they compare the question
# with the scene rather than copy from it ("Is there a circle?", "Is the circle red?").
# Two-shape scenes get a slot of their own: telling which colour goes with which shape is what the language model
# finds hardest ("Is the square red?" about a red circle and a blue square).
TEXT_SLOTS: tuple[str, ...] = ("describe", "text_only", "pope", "pope", "pope", "color_check", "color_check", "scene",
                               "two_shape_scene")


def _text_sample(slot: int, rng: random.Random) -> tuple[str, str]:
    """One text-only pretraining sample (question, answer) of kind ``TEXT_SLOTS[slot]``."""
    kind = TEXT_SLOTS[slot]
    if kind == "text_only":
        return rng.choice(TEXT_ONLY_QA)
    if kind == "pope":
        spec, shape, answer = pope_training_question(rng)
        return scene_prompt(spec, pope_question(shape)), answer
    if kind == "color_check":
        spec = random_shape_spec(rng)
        question, answer = color_check_question(spec, rng)
        return scene_prompt(spec, question), answer
    if kind == "two_shape_scene":
        spec = random_shape_spec(rng, num_shapes=2)
        question, answer = gqa_question(spec, rng)
        return scene_prompt(spec, question), answer
    spec = random_word_spec(rng) if rng.random() < 0.2 else random_shape_spec(rng)
    if kind == "describe":  # describing a scene given in words: the text twin of captioning
        return f"Scene: {caption(spec)}\n{CAPTION_PROMPT}", caption(spec)
    return scene_question(spec, rng)


def generate_training_data(root: str | Path, *, seed: int = 0, num_samples: int = 1200,
                           num_pretrain: int | None = None) -> Path:
    """Write ``root/images/*.png``, ``root/instruct.json``, ``root/pretrain.json`` and ``root/pretrain_text.json``.

    instruct.json mixes GQA-style short answers, POPE-style yes/no, ScienceQA-style
    multiple choice (with and without image), TextVQA-style OCR questions and a few
    text-only chats, in LLaVA's instruction format. Two more files give the demo's tiny base the abilities a real
    LLaVA base brings, in the order a real one acquires them: ``pretrain_text.json`` (text only: questions in
    GQA's, POPE's and TextVQA's formats about a scene described in words, scene descriptions, chats — the language
    model's skills, Vicuna's stand-in) and ``pretrain.json`` (captioning, "<image>\\nDescribe the image briefly." ->
    caption — LLaVA's stage-1 alignment of vision tower and projector). The image questions themselves appear
    only in instruct.json.
    Returns ``root``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    root = Path(root)
    rng = random.Random(f"road_vlm-train-{seed}")
    num_pretrain = num_samples // 2 if num_pretrain is None else num_pretrain
    instruct: list[dict[str, Any]] = []
    specs: dict[str, dict[str, Any]] = {}
    image_index = 0

    def new_image(spec: ImageSpec) -> str:
        nonlocal image_index
        rel = f"images/train_{image_index:06d}.png"
        image_index += 1
        _save_png(render_image(spec), root / rel)
        specs[rel] = _spec_record(spec)
        return rel

    families, weights = list(INSTRUCT_FAMILIES), list(INSTRUCT_FAMILIES.values())
    for i in range(num_samples):
        family = rng.choices(families, weights=weights)[0]
        sid = f"train-{i:06d}"
        if family == "gqa":
            spec = random_shape_spec(rng)
            turns = []
            for t in range(rng.choice((1, 1, 2))):
                q, a = gqa_question(spec, rng)
                turns += [_human(f"{q}\n{SHORT_ANSWER_SUFFIX}", t == 0), _gpt(a)]
            instruct.append({"id": sid, "image": new_image(spec), "conversations": turns})
        elif family == "pope":
            spec, shape, answer = pope_training_question(rng)
            text = f"{pope_question(shape)}\n{SHORT_ANSWER_SUFFIX}"
            instruct.append({"id": sid, "image": new_image(spec), "conversations": [_human(text, True), _gpt(answer)]})
        elif family == "sqa_img":
            spec = random_shape_spec(rng, num_shapes=1)
            hint, q, choices, ans = sqa_image_problem(spec, rng)
            text = f"{sqa_text(hint or 'N/A', q, choices)}\n{MC_SUFFIX}"
            instruct.append({"id": sid, "image": new_image(spec),
                             "conversations": [_human(text, True), _gpt(OPTION_LETTERS[ans])]})
        elif family == "sqa_text":
            hint, q, choices, ans = sqa_text_problem(rng)
            text = f"{sqa_text(hint, q, choices)}\n{MC_SUFFIX}"
            instruct.append({"id": sid, "conversations": [_human(text, False), _gpt(OPTION_LETTERS[ans])]})
        elif family == "textvqa":
            spec = random_word_spec(rng)
            q, a = textvqa_question(spec, rng)
            instruct.append({"id": sid, "image": new_image(spec),
                             "conversations": [_human(f"{q}\n{SHORT_ANSWER_SUFFIX}", True), _gpt(a)]})
        else:
            q, a = rng.choice(TEXT_ONLY_QA)
            instruct.append({"id": sid, "conversations": [_human(q, False), _gpt(a)]})

    pretrain: list[dict[str, Any]] = []
    for i in range(num_pretrain):  # signs are a third: reading a word is harder for the tiny vision than a shape
        spec = random_word_spec(rng) if rng.random() < 0.35 else random_shape_spec(rng)
        pretrain.append({"id": f"pretrain-{i:06d}", "image": new_image(spec),
                         "conversations": [_human(CAPTION_PROMPT, True), _gpt(caption(spec))]})
    # Drawn last from the shared stream: a change to the text mix leaves instruct.json and pretrain.json as they were.
    pretrain_text: list[dict[str, Any]] = []
    for i in range(5 * num_pretrain):
        text, answer = _text_sample(i % len(TEXT_SLOTS), rng)
        pretrain_text.append({"id": f"text-{i:06d}", "conversations": [_human(text, False), _gpt(answer)]})
    _write_json(root / "instruct.json", instruct)
    _write_json(root / "pretrain.json", pretrain)
    _write_json(root / "pretrain_text.json", pretrain_text)
    _write_json(root / SPECS_FILE, specs)
    return root


def generate_eval_data(root: str | Path, *, seed: int = 1, num_per_benchmark: int = 60) -> Path:
    """Write GQA, ScienceQA, TextVQA and POPE under ``root`` in LLaVA-1.5's eval layout.

    Layout (LLaVA's ``playground/data/eval``)::

        gqa/llava_gqa_testdev_balanced.jsonl, gqa/testdev_balanced_questions.json, gqa/data/images/
        scienceqa/llava_test_CQM-A.json, scienceqa/problems.json, scienceqa/pid_splits.json, scienceqa/images/test/<pid>/
        textvqa/llava_textvqa_val_v051_ocr.jsonl, textvqa/TextVQA_0.5.1_val.json, textvqa/train_images/
        pope/llava_pope_test.jsonl, pope/coco/coco_pope_{adversarial,popular,random}.json, pope/val2014/

    POPE gets ``num_per_benchmark`` questions per category (rounded up to even: one yes and
    one no per image). Returns ``root``.
    """
    if num_per_benchmark < 2:
        raise ValueError(f"num_per_benchmark must be >= 2, got {num_per_benchmark}")
    root = Path(root)
    # A string seed namespace different from training's, so images and questions differ.
    rng = random.Random(f"road_vlm-eval-{seed}")
    n = num_per_benchmark
    specs: dict[str, dict[str, Any]] = {}

    def save(spec: ImageSpec, rel: str) -> None:
        _save_png(render_image(spec), root / rel)
        specs[rel] = _spec_record(spec)

    # GQA ---------------------------------------------------------------------------
    gqa_rows, gqa_questions = [], {}
    for i in range(n):
        spec = random_shape_spec(rng)
        image_id = f"n{900000 + i}"
        qid = str(20000000 + i)
        save(spec, f"gqa/data/images/{image_id}.png")
        q, a = gqa_question(spec, rng)
        gqa_rows.append({"question_id": qid, "image": f"{image_id}.png", "text": f"{q}\n{SHORT_ANSWER_SUFFIX}"})
        gqa_questions[qid] = {"imageId": image_id, "question": q, "answer": a, "fullAnswer": f"{a}.",
                              "isBalanced": True, "types": {"structural": "query", "semantic": "attr", "detailed": "synthetic"}}
    _write_jsonl(root / "gqa" / "llava_gqa_testdev_balanced.jsonl", gqa_rows)
    _write_json(root / "gqa" / "testdev_balanced_questions.json", gqa_questions)

    # ScienceQA -----------------------------------------------------------------------
    sqa_llava, problems, test_pids = [], {}, []
    for i in range(n):
        pid = str(100000 + i)
        with_image = rng.random() < 0.7
        if with_image:
            spec = random_shape_spec(rng, num_shapes=1)
            hint, q, choices, ans = sqa_image_problem(spec, rng)
            save(spec, f"scienceqa/images/test/{pid}/image.png")
        else:
            hint, q, choices, ans = sqa_text_problem(rng)
        problems[pid] = {"question": q, "choices": choices, "answer": ans, "hint": hint,
                         "image": "image.png" if with_image else None, "task": "closed choice", "grade": "grade1",
                         "subject": "natural science", "topic": "shapes", "category": "Shapes", "skill": "shapes",
                         "lecture": "", "solution": "", "split": "test"}
        value = sqa_text(hint or "N/A", q, choices)
        entry: dict[str, Any] = {"id": pid}
        if with_image:
            entry["image"] = f"{pid}/image.png"
            value = f"{value}\n<image>"
        entry["conversations"] = [{"from": "human", "value": value},
                                  {"from": "gpt", "value": f"The answer is {OPTION_LETTERS[ans]}."}]
        sqa_llava.append(entry)
        test_pids.append(pid)
    _write_json(root / "scienceqa" / "llava_test_CQM-A.json", sqa_llava)
    _write_json(root / "scienceqa" / "problems.json", problems)
    _write_json(root / "scienceqa" / "pid_splits.json", {"train": [], "val": [], "test": test_pids, "minival": []})

    # TextVQA -----------------------------------------------------------------------
    # As in LLaVA's file, question_id is the *image* id and some images have two questions (val: 5,000 questions
    # on 3,166 images). The second questions draw from their own generator, so the rest of the data is unchanged.
    tv_rows, tv_data = [], []
    second_rng = random.Random(f"road_vlm-eval-{seed}-textvqa-second-questions")

    def add_textvqa(spec: ImageSpec, image_id: str, q: str, a: str, r: random.Random) -> None:
        question = q.split("\n")[0]
        tv_rows.append({"question_id": image_id, "image": f"{image_id}.png", "text": f"{q}\n{SHORT_ANSWER_SUFFIX}"})
        # Human answers vary a little, as on TextVQA, so soft accuracy is exercised.
        answers = [a] * 10
        for k in r.sample(range(10), r.choice((0, 1, 2))):
            answers[k] = r.choice([f"the {a}", a.upper(), f"{a} sign"])
        tv_data.append({"question": question, "image_id": image_id, "image_classes": ["Sign"],
                        "image_width": spec.width, "image_height": spec.height, "answers": answers,
                        "question_tokens": question.rstrip("?").lower().split(), "question_id": 50000 + len(tv_data),
                        "set_name": "val"})

    for i in range(n):
        spec = random_word_spec(rng)
        image_id = f"{0xa000 + i:016x}"
        save(spec, f"textvqa/train_images/{image_id}.png")
        q, a = textvqa_question(spec, rng)
        add_textvqa(spec, image_id, q, a, rng)
        if i % 4 == 0:
            other = second_rng.choice([t for t in TEXTVQA_QUESTIONS if t != q.split("\n")[0]])
            q2, a2 = textvqa_question(spec, second_rng, question=other)
            add_textvqa(spec, image_id, q2, a2, second_rng)
    _write_jsonl(root / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl", tv_rows)
    _write_json(root / "textvqa" / "TextVQA_0.5.1_val.json",
                {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": tv_data})

    # POPE ----------------------------------------------------------------------------
    n_images = math.ceil(n / 2)
    pope_specs = [random_shape_spec(rng) for _ in range(n_images)]
    frequency: dict[str, int] = {}
    cooccurrence: dict[tuple[str, str], int] = {}
    for spec in pope_specs:
        names = spec.shape_names()
        for s in names:
            frequency[s] = frequency.get(s, 0) + 1
            for t in names:
                if s != t:
                    cooccurrence[(s, t)] = cooccurrence.get((s, t), 0) + 1
    image_names = []
    for i, spec in enumerate(pope_specs):
        name = f"COCO_val2014_{500000 + i:012d}.png"
        save(spec, f"pope/val2014/{name}")
        image_names.append(name)
    pope_rows: list[dict[str, Any]] = []
    for category in POPE_CATEGORIES:
        labels = []
        for i, spec in enumerate(pope_specs):
            positive = rng.choice(spec.shapes).shape
            negative = pope_negative(spec, category, rng, frequency, cooccurrence)
            pair = [(positive, "yes"), (negative, "no")]
            rng.shuffle(pair)
            for shape, label in pair:
                labels.append({"question_id": len(labels) + 1, "image": image_names[i],
                               "text": pope_question(shape), "label": label})
        for lab in labels:
            pope_rows.append({"question_id": len(pope_rows) + 1, "image": lab["image"],
                              "text": f"{lab['text']}\n{SHORT_ANSWER_SUFFIX}", "category": category})
        _write_jsonl(root / "pope" / "coco" / f"coco_pope_{category}.json", labels)
    _write_jsonl(root / "pope" / "llava_pope_test.jsonl", pope_rows)
    _write_json(root / SPECS_FILE, specs)
    return root
