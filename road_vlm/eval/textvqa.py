"""TextVQA val (v0.5.1), as LLaVA-1.5 evaluates it (scripts/v1_5/eval/textvqa.sh).

Questions: ``textvqa/llava_textvqa_val_v051_ocr.jsonl``; ``text`` is three lines: the question,
``Reference OCR token: ...`` and the short-answer suffix. ``question_id`` is TextVQA's image id.
Annotations: ``textvqa/TextVQA_0.5.1_val.json`` (``data`` list, 10 answers per question).
Scorer: llava/eval/eval_textvqa.py: the question is recovered from the recorded prompt, the
annotation is found by (image_id, lowercased question), then EvalAI normalisation and VQA soft
accuracy with 10-choose-9 averaging.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from road_vlm.eval.common import (
    EvalDataError,
    EvalQuestion,
    check_images,
    qid_key,
    require_text,
    read_json,
    read_question_file,
    require_fields,
)
from road_vlm.eval.vqa_normalize import vqa_accuracy

NAME = "textvqa"
QUESTION_FILE = "textvqa/llava_textvqa_val_v051_ocr.jsonl"
ANNOTATION_FILE = "textvqa/TextVQA_0.5.1_val.json"
DEFAULT_IMAGE_DIR = "textvqa/train_images"
MAX_NEW_TOKENS = 128
_OCR_FIRST_RE = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def load(data_root: str | Path, image_dir: str | Path | None = None, *, check_files: bool = True) -> list[EvalQuestion]:
    root = Path(data_root)
    source = root / QUESTION_FILE
    images = root / (image_dir or DEFAULT_IMAGE_DIR)
    questions = read_question_file(source, "TextVQA question file", images, max_new_tokens=MAX_NEW_TOKENS)
    # The scorer keys annotations by (image id, question), so that pair must be unique, not the id alone.
    seen: set[tuple[str, str]] = set()
    for q in questions:
        pair = (q.key, question_from_prompt(q.prompt))
        if pair in seen:
            raise EvalDataError(f"{source}: duplicate question {pair[1]!r} for image id {q.question_id!r}")
        seen.add(pair)
    if not questions:
        raise EvalDataError(f"{source}: the benchmark has no questions")
    if check_files:
        check_images(questions, images, NAME)
    return questions


def question_from_prompt(prompt: str) -> str:
    """eval_textvqa.py's prompt_processor: the question line of a recorded prompt, lowercased."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_FIRST_RE.search(prompt)
        if match is None:
            raise EvalDataError(f"cannot find 'Question: ... Short answer:' in prompt {prompt!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise EvalDataError(f"unrecognised TextVQA prompt layout ({len(lines)} lines): {prompt!r}")
    return question.lower()


def load_annotations(root: Path) -> dict[tuple[str, str], list[str]]:
    path = root / ANNOTATION_FILE
    raw = read_json(path, "TextVQA annotation file")
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise EvalDataError(f"{path}: expected an object with a 'data' list")
    out = {}
    for i, ann in enumerate(raw["data"], start=1):
        require_fields(ann, ("image_id", "question", "answers"), f"{path}: data[{i - 1}]")
        if len(ann["answers"]) != 10:
            raise EvalDataError(f"{path}: data[{i - 1}] has {len(ann['answers'])} answers; VQA accuracy needs 10")
        out[(qid_key(ann["image_id"]), ann["question"].lower())] = ann["answers"]
    return out


def score(predictions: list[dict[str, Any]], data_root: str | Path, *, limit: int | None = None,
          source: str = "predictions") -> dict[str, float]:
    """{"accuracy": percent}: mean VQA soft accuracy over the questions (all of them, or the
    first ``limit``); every question needs exactly one prediction."""
    root = Path(data_root)
    annotations = load_annotations(root)
    questions = load(root, check_files=False)
    if limit is not None:
        questions = questions[:limit]
    expected = {(q.key, question_from_prompt(q.prompt)) for q in questions}
    got: dict[tuple[str, str], dict[str, Any]] = {}
    for i, row in enumerate(predictions, start=1):
        if "question_id" not in row or "text" not in row or "prompt" not in row:
            raise EvalDataError(f"{source}: prediction #{i} lacks 'question_id', 'prompt' or 'text'")
        require_text(row, source, i)
        pair = (qid_key(row["question_id"]), question_from_prompt(str(row["prompt"])))
        if pair not in annotations:
            raise EvalDataError(f"{source}: prediction #{i} (question_id {row['question_id']!r}, question "
                                f"{pair[1]!r}) matches no annotation in {root / ANNOTATION_FILE}")
        if pair in got:
            raise EvalDataError(f"{source}: duplicate prediction for question_id {row['question_id']!r} ({pair[1]!r})")
        got[pair] = row
    foreign = [p for p in got if p not in expected]
    if foreign and limit is None:
        raise EvalDataError(f"{source}: prediction for question_id {foreign[0][0]!r} is not in {root / QUESTION_FILE}")
    missing = [p for p in expected if p not in got]
    if missing:
        raise EvalDataError(f"{source}: {len(missing)} of {len(expected)} textvqa questions have no prediction "
                            f"(e.g. {missing[0][0]}); refusing to report a partial score")
    total = sum(vqa_accuracy(str(got[p]["text"]), annotations[p]) for p in expected)
    return {"accuracy": 100.0 * total / len(expected)}
