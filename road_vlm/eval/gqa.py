"""GQA testdev-balanced, as LLaVA-1.5 evaluates it (scripts/v1_5/eval/gqa.sh).

Questions: ``gqa/llava_gqa_testdev_balanced.jsonl`` (``question_id``, ``image``, ``text`` with the
short-answer suffix already in it). Annotations: ``gqa/testdev_balanced_questions.json`` (GQA's
own file). Score: LLaVA's convert_gqa_for_eval.py (strip trailing periods, lowercase) followed by
GQA's eval.py accuracy: exact string match, averaged over questions flagged ``isBalanced``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from road_vlm.eval.common import (
    EvalDataError,
    EvalQuestion,
    check_images,
    check_unique,
    index_predictions,
    qid_key,
    read_json,
    read_question_file,
    require_complete,
)

NAME = "gqa"
QUESTION_FILE = "gqa/llava_gqa_testdev_balanced.jsonl"
ANNOTATION_FILE = "gqa/testdev_balanced_questions.json"
DEFAULT_IMAGE_DIR = "gqa/data/images"
MAX_NEW_TOKENS = 128


def load(data_root: str | Path, image_dir: str | Path | None = None, *, check_files: bool = True) -> list[EvalQuestion]:
    """GQA questions in file order; ``image_dir`` is relative to ``data_root`` unless absolute."""
    root = Path(data_root)
    source = root / QUESTION_FILE
    images = root / (image_dir or DEFAULT_IMAGE_DIR)
    questions = read_question_file(source, "GQA question file", images, max_new_tokens=MAX_NEW_TOKENS)
    check_unique(questions, source)
    if check_files:
        check_images(questions, images, NAME)
    return questions


def normalize_prediction(text: str) -> str:
    """LLaVA's convert_gqa_for_eval.py: drop every trailing '.', then lowercase (nothing else)."""
    return text.rstrip(".").lower()


def score(predictions: list[dict[str, Any]], data_root: str | Path, *, limit: int | None = None,
          source: str = "predictions") -> dict[str, float]:
    """{"accuracy": percent} over the balanced questions (the first ``limit`` of the question file
    when a limit is given). Every scored question needs a prediction, as in GQA's eval.py."""
    root = Path(data_root)
    annotations = read_json(root / ANNOTATION_FILE, "GQA annotation file")
    if not isinstance(annotations, dict):
        raise EvalDataError(f"{root / ANNOTATION_FILE}: expected a JSON object keyed by question id")
    by_key = {qid_key(k): v for k, v in annotations.items()}
    preds = index_predictions(predictions, source, known=set(by_key))
    if limit is None:
        scope = list(by_key)
    else:
        scope = [q.key for q in load(root, check_files=False)[:limit]]
        unknown = [k for k in scope if k not in by_key]
        if unknown:
            raise EvalDataError(f"{root / ANNOTATION_FILE}: no annotation for question id(s) {', '.join(unknown[:3])}")
    balanced = [k for k in scope if by_key[k].get("isBalanced", False)]
    if not balanced:
        raise EvalDataError(f"{root / ANNOTATION_FILE}: no balanced questions to score")
    require_complete(balanced, preds, source, NAME)
    correct = 0
    for k in balanced:
        if "answer" not in by_key[k]:
            raise EvalDataError(f"{root / ANNOTATION_FILE}: question {k} has no 'answer'")
        correct += normalize_prediction(str(preds[k]["text"])) == by_key[k]["answer"]
    return {"accuracy": 100.0 * correct / len(balanced)}
