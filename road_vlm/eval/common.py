"""Shared pieces of the benchmark modules: the question record, file readers with precise errors,
and the LLaVA-1.5 prompt suffixes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


class EvalDataError(ValueError):
    """Benchmark data or a predictions file that is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class EvalQuestion:
    """One benchmark question, ready for generation.

    ``question`` is the user text passed to the v1 template (without ``<image>``; the template
    puts the image first). ``prompt`` is what LLaVA's generator records in the answers file's
    ``prompt`` field (scorers such as ScienceQA's and TextVQA's read it back).
    """

    question_id: Any
    question: str
    prompt: str
    image: Path | None
    max_new_tokens: int = 128
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        return qid_key(self.question_id)

    @property
    def answer_key(self) -> tuple[str, str]:
        """What identifies this question's row in an answers file: (question id, prompt). LLaVA's TextVQA file
        uses the *image* id as question_id (5,000 val questions on 3,166 images), and its scorer matches answers
        by (question_id, prompt); for the other benchmarks the id alone is unique and this is equivalent."""
        return (self.key, self.prompt)


def qid_key(question_id: Any) -> str:
    """Question ids are compared as strings: LLaVA's files mix ints (POPE) and strings (GQA)."""
    return str(question_id)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise EvalDataError(f"{path}: {what} not found")
    return path


def read_json(path: Path, what: str) -> Any:
    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path}: {what} is not valid JSON (line {err.lineno}: {err.msg})") from err


def read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    """Read a JSON-lines file strictly: any bad line is an error naming the file and line."""
    require_file(path, what)
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(f"{path}:{lineno}: {what} line is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}:{lineno}: {what} line is not a JSON object")
            rows.append(row)
    return rows


def read_question_file(source: Path, what: str, images: Path, *, max_new_tokens: int,
                       categorized: bool = False) -> list[EvalQuestion]:
    """LLaVA's eval question files (GQA, TextVQA, POPE): JSON lines with ``question_id``, ``image`` and ``text``
    (the prompt as given to the model) and, when ``categorized``, a ``category``. Errors name file and question."""
    fields = ("question_id", "image", "text", "category") if categorized else ("question_id", "image", "text")
    questions = []
    for i, row in enumerate(read_jsonl(source, what), start=1):
        require_fields(row, fields, f"{source}: question #{i}")
        questions.append(EvalQuestion(question_id=row["question_id"], question=row["text"], prompt=row["text"],
                                      image=images / row["image"], max_new_tokens=max_new_tokens,
                                      category=row["category"] if categorized else None,
                                      extra={"image_name": row["image"]}))
    return questions


def require_fields(row: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)}")


def check_images(questions: list[EvalQuestion], image_dir: Path, benchmark: str) -> None:
    """Fail before generation when images are missing, naming a few of them."""
    if not image_dir.is_dir():
        raise EvalDataError(f"{image_dir}: {benchmark} image folder not found")
    missing = [q for q in questions if q.image is not None and not q.image.is_file()]
    if missing:
        names = ", ".join(f"{q.image} (question {q.question_id})" for q in missing[:3])
        raise EvalDataError(f"{benchmark}: {len(missing)} image(s) missing, e.g. {names}")


def check_unique(questions: list[EvalQuestion], source: Path) -> None:
    seen: set[str] = set()
    for q in questions:
        if q.key in seen:
            raise EvalDataError(f"{source}: duplicate question_id {q.question_id!r}")
        seen.add(q.key)
    if not questions:
        raise EvalDataError(f"{source}: the benchmark has no questions")


def index_predictions(predictions: list[dict[str, Any]], source: str, known: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Map question id -> prediction, rejecting duplicates, rows without ids/text and foreign ids."""
    out: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(predictions, start=1):
        if "question_id" not in row or "text" not in row:
            raise EvalDataError(f"{source}: prediction #{i} lacks 'question_id' or 'text'")
        require_text(row, source, i)
        key = qid_key(row["question_id"])
        if key in out:
            raise EvalDataError(f"{source}: duplicate prediction for question_id {row['question_id']!r} (row #{i})")
        if known is not None and key not in known:
            raise EvalDataError(f"{source}: prediction #{i} has question_id {row['question_id']!r}, "
                                "which is not a question of this benchmark")
        out[key] = row
    return out


def require_text(row: dict[str, Any], source: str, index: int) -> None:
    """An answer's text must be a string: a null would otherwise score as something (POPE: "None" -> yes)."""
    if not isinstance(row["text"], str):
        raise EvalDataError(f"{source}: prediction #{index} (question_id {row.get('question_id')!r}) has text "
                            f"{row['text']!r}; expected a string")


def require_complete(expected: list[str], have: dict[str, Any], source: str, benchmark: str) -> None:
    missing = [k for k in expected if k not in have]
    if missing:
        raise EvalDataError(f"{source}: {len(missing)} of {len(expected)} {benchmark} questions have no prediction "
                            f"(e.g. {', '.join(missing[:3])}); refusing to report a partial score")
