"""Answers files in LLaVA's format (one JSON object per line: question_id, prompt, text, answer_id,
model_id, metadata): crash-tolerant reading, appending, shard files and merging."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

from road_vlm.eval.common import EvalDataError, EvalQuestion, qid_key
from road_vlm.filenames import PREDICTIONS

logger = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^predictions\.rank(\d+)-of-(\d+)\.jsonl$")


def shard_file(directory: Path, rank: int, world_size: int) -> Path:
    return directory / f"predictions.rank{rank}-of-{world_size}.jsonl"


def shard_files(directory: Path) -> list[Path]:
    """Every per-rank file in ``directory`` (from this or an earlier run with any world size)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SHARD_RE.match(p.name))


def read_predictions(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Read an answers file. A last line cut short by a killed run (no newline, not valid JSON) is
    dropped with a warning, and removed from the file when ``repair``; any other bad line is an
    error naming the file and line. A missing file reads as empty."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # bytes after the last newline: b"" for a cleanly ended file
    rows: list[dict[str, Any]] = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        rows.append(_parse(raw, path, lineno))
    keep = len(data)
    if tail.strip():
        try:
            rows.append(_parse(tail, path, len(lines) + 1))
            keep = -1  # complete object, only its newline is missing
        except EvalDataError:
            logger.warning("%s:%d: dropping a truncated last line (%d bytes) left by an interrupted run",
                           path, len(lines) + 1, len(tail))
            keep = len(data) - len(tail)
    if repair and keep != len(data):
        with path.open("r+b") as handle:
            if keep == -1:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                handle.truncate(keep)
    return rows


def _parse(raw: bytes, path: Path, lineno: int) -> dict[str, Any]:
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalDataError(f"{path}:{lineno}: not a valid JSON answer line ({err})") from err
    if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
        raise EvalDataError(f"{path}:{lineno}: an answer line needs 'question_id' and 'text'")
    return row


AnswerKey = tuple[str, str]  # (question id as a string, prompt): EvalQuestion.answer_key


def check_rows(rows: list[dict[str, Any]], path: Path, questions: list[EvalQuestion]) -> dict[AnswerKey, dict[str, Any]]:
    """Index rows by (question id, prompt), as LLaVA's scorers match answers. A row for no question of the
    benchmark, a question answered twice, or an answer generated for another prompt means the file belongs to
    something else: a clear error rather than a silently wrong score. A row without ``prompt`` (answers from
    another tool) is matched by its id where that id is unique."""
    prompts: dict[str, list[str]] = {}
    for q in questions:
        prompts.setdefault(q.key, []).append(q.prompt)
    out: dict[AnswerKey, dict[str, Any]] = {}
    for row in rows:
        qid = qid_key(row["question_id"])
        if qid not in prompts:
            raise EvalDataError(f"{path}: question_id {row['question_id']!r} is not a question of this benchmark "
                                "(answers from another benchmark or data root?)")
        if "prompt" in row:
            prompt = row["prompt"]
        elif len(prompts[qid]) == 1:
            prompt = prompts[qid][0]
        else:
            raise EvalDataError(f"{path}: an answer to question_id {row['question_id']!r} has no 'prompt', and "
                                f"{len(prompts[qid])} questions share that id (TextVQA ids are image ids)")
        if prompt not in prompts[qid]:
            # Same id, other text: answers from an older or different question file.
            asks = (f"now asks {prompts[qid][0]!r}" if len(prompts[qid]) == 1
                    else f"asks none of its {len(prompts[qid])} questions with that id so")
            raise EvalDataError(f"{path}: the answer to question_id {row['question_id']!r} was generated for "
                                f"prompt {prompt!r}, but the question file {asks}; use a fresh --output")
        key = (qid, prompt)
        if key in out:
            raise EvalDataError(f"{path}: question_id {row['question_id']!r} is answered twice"
                                + (f" for prompt {prompt!r}" if len(prompts[qid]) > 1 else ""))
        out[key] = row
    return out


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows and flush them to disk, so a kill loses at most the batch in flight."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def write_ordered(path: Path, questions: list[EvalQuestion], answered: dict[AnswerKey, dict[str, Any]]) -> None:
    """Atomically rewrite ``path`` with the answered rows in question-file order."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for q in questions:
            if q.answer_key in answered:
                handle.write(json.dumps(answered[q.answer_key], ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def collect_answered(directory: Path, questions: list[EvalQuestion], *,
                     own: Path | None = None) -> dict[AnswerKey, dict[str, Any]]:
    """All answers already on disk for this benchmark (by ``EvalQuestion.answer_key``): the merged file and every
    shard file. Only ``own`` (the file this process appends to) is repaired in place."""
    answered: dict[AnswerKey, dict[str, Any]] = {}
    for path in [directory / PREDICTIONS, *shard_files(directory)]:
        rows = check_rows(read_predictions(path, repair=path == own), path, questions)
        for key, row in rows.items():
            answered.setdefault(key, row)  # a question in two files: the merged file wins
    return answered


def merge(directory: Path, questions: list[EvalQuestion]) -> dict[AnswerKey, dict[str, Any]]:
    """Fold every shard file into ``predictions.jsonl`` (question order) and delete the shards."""
    merged = directory / PREDICTIONS
    answered = collect_answered(directory, questions, own=merged)
    write_ordered(merged, questions, answered)
    for path in shard_files(directory):
        path.unlink()
    return answered
