"""ScienceQA test split (reported: IMG-accuracy), as LLaVA-1.5 evaluates it (scripts/v1_5/eval/sqa.sh).

Questions: ``scienceqa/llava_test_CQM-A.json`` (a JSON array; only the first human turn is used).
Prompt: the turn without ``<image>``, + "\\n" + the multiple-choice suffix; image questions get the
image, text-only questions get none. Scorer: llava/eval/eval_science_qa.py over
``pid_splits.json["test"]`` with ``problems.json``: a missing prediction is text "FAILED" with
prompt "Unknown" (wrong, and outside the IMG subset, because the subset is decided by whether the
recorded prompt contains ``<image>``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from road_vlm.eval.common import (
    MC_SUFFIX,
    EvalDataError,
    EvalQuestion,
    check_images,
    check_unique,
    index_predictions,
    qid_key,
    read_json,
)

logger = logging.getLogger(__name__)

NAME = "scienceqa"
QUESTION_FILE = "scienceqa/llava_test_CQM-A.json"
PROBLEMS_FILE = "scienceqa/problems.json"
SPLITS_FILE = "scienceqa/pid_splits.json"
DEFAULT_IMAGE_DIR = "scienceqa/images/test"
MAX_NEW_TOKENS = 1024
OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_RE = re.compile(r"The answer is ([A-Z]).")


def load(data_root: str | Path, image_dir: str | Path | None = None, *, check_files: bool = True) -> list[EvalQuestion]:
    root = Path(data_root)
    source = root / QUESTION_FILE
    images = root / (image_dir or DEFAULT_IMAGE_DIR)
    rows = read_json(source, "ScienceQA question file")
    if not isinstance(rows, list):
        raise EvalDataError(f"{source}: expected a JSON array of questions")
    questions = []
    for i, row in enumerate(rows, start=1):
        where = f"{source}: question #{i}"
        if not isinstance(row, dict) or "id" not in row or not row.get("conversations"):
            raise EvalDataError(f"{where}: needs 'id' and a non-empty 'conversations' list")
        first = row["conversations"][0]
        if not isinstance(first, dict) or not isinstance(first.get("value"), str):
            raise EvalDataError(f"{where} (id {row['id']}): first turn has no text 'value'")
        qs = first["value"].replace("<image>", "").strip()
        has_image = "image" in row  # model_vqa_science.py checks the key, not its value
        prompt = f"<image>\n{qs}" if has_image else qs
        questions.append(EvalQuestion(
            question_id=row["id"], question=f"{qs}\n{MC_SUFFIX}", prompt=f"{prompt}\n{MC_SUFFIX}",
            image=images / row["image"] if has_image else None, max_new_tokens=MAX_NEW_TOKENS))
    check_unique(questions, source)
    if check_files:
        check_images(questions, images, NAME)
    return questions


def parse_answer(text: str, options: tuple[str, ...] = OPTIONS) -> str:
    """eval_science_qa.py's letter parsing: exact letter, then "X. ...", then a unique
    "The answer is X." match (the final '.' is a regex wildcard); otherwise "FAILED"."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_RE.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def answer_index(letter: str, num_choices: int, options: tuple[str, ...] = OPTIONS) -> int:
    """Index of the letter among the question's options; -1 (always wrong) when out of range or FAILED."""
    return options.index(letter) if letter in options[:num_choices] else -1


def score(predictions: list[dict[str, Any]], data_root: str | Path, *, limit: int | None = None,
          source: str = "predictions") -> dict[str, float]:
    """{"accuracy", "img_accuracy"} in percent over pid_splits["test"] (or the first ``limit``
    questions of the question file)."""
    root = Path(data_root)
    splits = read_json(root / SPLITS_FILE, "ScienceQA pid_splits file")
    problems = read_json(root / PROBLEMS_FILE, "ScienceQA problems file")
    if not isinstance(splits, dict) or "test" not in splits:
        raise EvalDataError(f"{root / SPLITS_FILE}: no 'test' split")
    if limit is None:
        pids = [qid_key(p) for p in splits["test"]]
    else:
        pids = [q.key for q in load(root, check_files=False)[:limit]]
    if not pids:
        raise EvalDataError(f"{root / SPLITS_FILE}: the test split is empty")
    problems = {qid_key(k): v for k, v in problems.items()}
    missing = [p for p in pids if p not in problems]
    if missing:
        raise EvalDataError(f"{root / PROBLEMS_FILE}: no problem for pid(s) {', '.join(missing[:3])}")
    preds = index_predictions(predictions, source, known=set(pids) if limit is None else set(problems))
    missing = sum(p not in preds for p in pids)
    if missing:
        logger.warning("%s: %d of %d ScienceQA questions have no answer; scored as FAILED and left out of the "
                       "IMG subset, as eval_science_qa.py does", source, missing, len(pids))
    correct = img_correct = img_total = 0
    for pid in pids:
        prob = problems[pid]
        pred = preds.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        letter = parse_answer(str(pred["text"]))
        ok = answer_index(letter, len(prob["choices"])) == prob["answer"]
        correct += ok
        if "<image>" in str(pred.get("prompt", "")):
            img_total += 1
            img_correct += ok
    # The official script divides by zero when no image question was answered; report 0 instead
    # of crashing, which is also what "no image question right" means.
    return {"accuracy": 100.0 * correct / len(pids),
            "img_accuracy": 100.0 * img_correct / img_total if img_total else 0.0}
