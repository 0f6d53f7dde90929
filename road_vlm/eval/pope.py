"""POPE (COCO; random / popular / adversarial), as LLaVA-1.5 evaluates it (scripts/v1_5/eval/pope.sh).

Questions: ``pope/llava_pope_test.jsonl`` (``question_id``, ``image``, ``text``, ``category``).
Labels: ``pope/coco/coco_pope_<category>.json`` (JSON lines with ``label`` yes/no), one file per
category and nothing else in that folder. LLaVA's eval_pope.py pairs answers with label lines *by
position* within each category; a label file from another POPE commit therefore silently scores
~50%. Here every label line is checked against the question at the same position (same image,
same question text) before scoring, and answers are paired with labels through that position.
Reported "POPE" = mean of the three per-category F1 scores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from road_vlm.eval.common import (
    EvalDataError,
    EvalQuestion,
    check_images,
    check_unique,
    index_predictions,
    read_jsonl,
    read_question_file,
    require_complete,
    require_fields,
)

logger = logging.getLogger(__name__)

NAME = "pope"
QUESTION_FILE = "pope/llava_pope_test.jsonl"
LABEL_DIR = "pope/coco"
DEFAULT_IMAGE_DIR = "pope/val2014"
MAX_NEW_TOKENS = 128
CATEGORIES = ("random", "popular", "adversarial")


def load(data_root: str | Path, image_dir: str | Path | None = None, *, check_files: bool = True) -> list[EvalQuestion]:
    root = Path(data_root)
    source = root / QUESTION_FILE
    images = root / (image_dir or DEFAULT_IMAGE_DIR)
    questions = read_question_file(source, "POPE question file", images, max_new_tokens=MAX_NEW_TOKENS, categorized=True)
    check_unique(questions, source)
    if check_files:
        check_images(questions, images, NAME)
    return questions


def parse_yes_no(text: str) -> str:
    """eval_pope.py: keep text before the first '.', drop ',', split on ' '; "no" iff a word is
    exactly "No", "not" or "no" (so "NO" and "Nope" count as yes)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy / precision / recall / F1 / yes-ratio in percent, positive = yes (a label other
    than "no" counts as yes, as in eval_pope.py)."""
    if not preds or len(preds) != len(labels):
        raise ValueError(f"need equally many predictions and labels, got {len(preds)} and {len(labels)}")
    tp = fp = tn = fn = 0
    for p, lab in zip(preds, labels):
        positive_label = lab != "no"
        if p == "yes":
            tp += positive_label
            fp += not positive_label
        else:
            fn += positive_label
            tn += not positive_label
    # eval_pope.py raises ZeroDivisionError here; 0 is the limit value and keeps reports readable.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100.0 * (tp + tn) / len(preds), "precision": 100.0 * precision,
            "recall": 100.0 * recall, "f1": 100.0 * f1, "yes_ratio": 100.0 * preds.count("yes") / len(preds)}


def load_labels(data_root: str | Path, questions: list[EvalQuestion]) -> dict[str, list[str]]:
    """Per category, the label of each question in question-file order, after checking that the
    label file lines up with the questions (length, image and question text at every position)."""
    root = Path(data_root)
    label_dir = root / LABEL_DIR
    if not label_dir.is_dir():
        raise EvalDataError(f"{label_dir}: POPE label folder not found")
    files = sorted(p for p in label_dir.iterdir() if not p.name.startswith("."))
    for path in files:
        if not (path.name.startswith("coco_pope_") and path.name.endswith(".json")):
            raise EvalDataError(f"{path}: unexpected file in the POPE label folder (only coco_pope_<category>.json)")
    by_category: dict[str, list[EvalQuestion]] = {}
    for q in questions:
        by_category.setdefault(str(q.category), []).append(q)
    for path in files:
        category = path.name[len("coco_pope_"):-len(".json")]
        if category not in by_category:
            raise EvalDataError(f"{path}: label file for category {category!r}, which no question in "
                                f"{root / QUESTION_FILE} has")
    labels: dict[str, list[str]] = {}
    for category, qs in by_category.items():
        path = label_dir / f"coco_pope_{category}.json"
        rows = read_jsonl(path, f"POPE {category} label file")
        if len(rows) != len(qs):
            raise EvalDataError(f"{path}: {len(rows)} labels but {root / QUESTION_FILE} has {len(qs)} "
                                f"'{category}' questions; answers are paired by position, so the label file must "
                                "come from the same POPE release as the questions")
        out = []
        for pos, (row, q) in enumerate(zip(rows, qs), start=1):
            require_fields(row, ("label",), f"{path}:{pos}")
            same_image = "image" not in row or row["image"] == q.extra.get("image_name")
            same_text = "text" not in row or q.prompt.split("\n")[0].strip() == str(row["text"]).strip()
            if not (same_image and same_text):
                raise EvalDataError(f"{path}:{pos}: label line ({row.get('image')!r}, {row.get('text')!r}) does not "
                                    f"match question {q.question_id!r} ({q.extra.get('image_name')!r}, "
                                    f"{q.prompt.splitlines()[0]!r}); label order differs from the question file")
            out.append(str(row["label"]))
        labels[category] = out
    return labels


def score(predictions: list[dict[str, Any]], data_root: str | Path, *, limit: int | None = None,
          source: str = "predictions") -> dict[str, Any]:
    """{"random": {...}, "popular": {...}, "adversarial": {...}, "f1_mean": ...}, all in percent.

    Each question's answer is paired with the label at its position in its category. For an
    answers file in question order (what road_vlm and LLaVA's scripts write) this is exactly
    eval_pope.py's positional pairing; for a reordered file it is the pairing eval_pope.py meant.
    """
    root = Path(data_root)
    questions = load(root, check_files=False)
    all_labels = load_labels(root, questions)
    if limit is not None:
        questions = questions[:limit]
    preds = index_predictions(predictions, source, known={q.key for q in questions} if limit is None
                              else {q.key for q in load(root, check_files=False)})
    require_complete([q.key for q in questions], preds, source, NAME)
    scored = {q.key for q in questions}
    order = [str(r["question_id"]) for r in predictions if str(r["question_id"]) in scored]
    if order != [q.key for q in questions]:
        logger.warning("%s: answers are not in question-file order; LLaVA's eval_pope.py would mis-pair them "
                       "with labels, road_vlm pairs them by question", source)
    position: dict[str, int] = {}
    per_category: dict[str, tuple[list[str], list[str]]] = {}
    for q in questions:
        cat = str(q.category)
        idx = position.get(cat, 0)
        position[cat] = idx + 1
        p, lab = per_category.setdefault(cat, ([], []))
        p.append(parse_yes_no(str(preds[q.key]["text"])))
        lab.append(all_labels[cat][idx])
    result: dict[str, Any] = {}
    for cat in CATEGORIES:
        if cat in per_category:
            result[cat] = binary_metrics(*per_category[cat])
    for cat in sorted(per_category):
        if cat not in result:
            result[cat] = binary_metrics(*per_category[cat])
    result["f1_mean"] = sum(m["f1"] for m in result.values()) / len(per_category)
    return result
