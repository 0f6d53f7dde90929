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

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
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


def check_rows(rows: list[dict[str, Any]], path: Path, known: set[str]) -> dict[str, dict[str, Any]]:
    """Index rows by question id; duplicate ids or ids that are not questions of the benchmark
    mean the file belongs to something else: a clear error rather than a silently wrong score."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = qid_key(row["question_id"])
        if key not in known:
            raise EvalDataError(f"{path}: question_id {row['question_id']!r} is not a question of this benchmark "
                                "(answers from another benchmark or data root?)")
        if key in out:
            raise EvalDataError(f"{path}: question_id {row['question_id']!r} is answered twice")
        out[key] = row
    return out


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows and flush them to disk, so a kill loses at most the batch in flight."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def write_ordered(path: Path, questions: list[EvalQuestion], answered: dict[str, dict[str, Any]]) -> None:
    """Atomically rewrite ``path`` with the answered rows in question-file order."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for q in questions:
            if q.key in answered:
                handle.write(json.dumps(answered[q.key], ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def collect_answered(directory: Path, questions: list[EvalQuestion], *, own: Path | None = None) -> dict[str, dict[str, Any]]:
    """All answers already on disk for this benchmark: the merged file and every shard file.
    Only ``own`` (the file this process appends to) is repaired in place."""
    prompts = {q.key: q.prompt for q in questions}
    answered: dict[str, dict[str, Any]] = {}
    for path in [directory / PREDICTIONS_FILE, *shard_files(directory)]:
        rows = check_rows(read_predictions(path, repair=path == own), path, set(prompts))
        for key, row in rows.items():
            if "prompt" in row and row["prompt"] != prompts[key]:
                # Same id, other text: answers from an older or different question file.
                raise EvalDataError(f"{path}: the answer to question_id {row['question_id']!r} was generated for "
                                    f"prompt {row['prompt']!r}, but the question file now asks {prompts[key]!r}; "
                                    "use a fresh --output")
            answered.setdefault(key, row)  # a question in two files: the merged file wins
    return answered


def merge(directory: Path, questions: list[EvalQuestion]) -> dict[str, dict[str, Any]]:
    """Fold every shard file into ``predictions.jsonl`` (question order) and delete the shards."""
    merged = directory / PREDICTIONS_FILE
    answered = collect_answered(directory, questions, own=merged)
    write_ordered(merged, questions, answered)
    for path in shard_files(directory):
        path.unlink()
    return answered
