"""Answers files: truncated tails from killed runs, corrupt lines, duplicates, shard merging."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from road_vlm.eval.common import EvalDataError, EvalQuestion
from road_vlm.eval.predictions import collect_answered, merge, read_predictions, shard_file
from road_vlm.eval.runner import run_benchmark, shard_bounds
from road_vlm.filenames import PREDICTIONS


def _row(qid: int, text: str = "yes") -> str:
    return json.dumps({"question_id": qid, "prompt": f"q{qid}", "text": text, "answer_id": "x", "model_id": "m",
                       "metadata": {}}) + "\n"


def _questions(n: int) -> list[EvalQuestion]:
    return [EvalQuestion(question_id=i, question=f"q{i}", prompt=f"q{i}", image=None) for i in range(1, n + 1)]


def test_truncated_last_line_is_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(_row(1) + _row(2) + _row(3)[:25])
    with caplog.at_level(logging.WARNING):
        rows = read_predictions(path)
    assert [r["question_id"] for r in rows] == [1, 2]
    assert "p.jsonl:3: dropping a truncated last line" in caplog.text
    assert path.read_text().endswith(_row(3)[:25])  # reading alone never modifies the file
    read_predictions(path, repair=True)
    assert path.read_text() == _row(1) + _row(2)


def test_complete_last_object_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(_row(1) + _row(2).rstrip("\n"))
    assert [r["question_id"] for r in read_predictions(path, repair=True)] == [1, 2]
    assert path.read_text() == _row(1) + _row(2)


def test_corrupt_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(_row(1) + "{garbage\n" + _row(3))
    with pytest.raises(EvalDataError, match=r"p.jsonl:2: not a valid JSON answer line"):
        read_predictions(path)
    path.write_text(_row(1) + '{"prompt": "no id"}\n')
    with pytest.raises(EvalDataError, match=r"p.jsonl:2: an answer line needs 'question_id' and 'text'"):
        read_predictions(path)


def test_duplicate_and_foreign_ids_in_an_existing_answers_file(tmp_path: Path) -> None:
    (tmp_path / PREDICTIONS).write_text(_row(1) + _row(1))
    with pytest.raises(EvalDataError, match="question_id 1 is answered twice"):
        run_benchmark(None, _questions(3), tmp_path, model_id="m", progress=False)
    (tmp_path / PREDICTIONS).write_text(_row(1) + _row(42))
    with pytest.raises(EvalDataError, match="question_id 42 is not a question of this benchmark"):
        run_benchmark(None, _questions(3), tmp_path, model_id="m", progress=False)


def test_answers_for_a_different_question_text_are_rejected(tmp_path: Path) -> None:
    (tmp_path / PREDICTIONS).write_text(_row(1).replace('"q1"', '"old question"'))
    with pytest.raises(EvalDataError, match="generated for prompt 'old question', but the question file now asks 'q1'"):
        run_benchmark(None, _questions(1), tmp_path, model_id="m", progress=False)


def test_fully_answered_benchmark_needs_no_model_and_is_rewritten_in_order(tmp_path: Path) -> None:
    (tmp_path / PREDICTIONS).write_text(_row(3) + _row(1) + _row(2))
    assert run_benchmark(None, _questions(3), tmp_path, model_id="m", progress=False) == 0
    assert [json.loads(x)["question_id"] for x in (tmp_path / PREDICTIONS).read_text().splitlines()] == [1, 2, 3]
    with pytest.raises(ValueError, match="1 questions still need answers but no model was given"):
        run_benchmark(None, _questions(4), tmp_path, model_id="m", progress=False)


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (9, 3), (1, 1), (0, 2)])
def test_shards_are_contiguous_and_cover_everything(n: int, world: int) -> None:
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    covered = [i for start, end in bounds for i in range(start, end)]
    assert covered == list(range(n))
    assert all(end - start <= -(-n // world) for start, end in bounds)
    with pytest.raises(ValueError):
        shard_bounds(n, world, world)


def test_merge_folds_shards_in_question_order(tmp_path: Path) -> None:
    questions = _questions(5)
    (tmp_path / PREDICTIONS).write_text(_row(1))
    shard_file(tmp_path, 1, 2).write_text(_row(5) + _row(4))
    shard_file(tmp_path, 0, 2).write_text(_row(3) + _row(2)[:10])  # rank 0 was killed mid-line
    assert set(collect_answered(tmp_path, questions)) == {("1", "q1"), ("3", "q3"), ("4", "q4"), ("5", "q5")}
    merge(tmp_path, questions)
    assert [json.loads(x)["question_id"] for x in (tmp_path / PREDICTIONS).read_text().splitlines()] == [1, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [PREDICTIONS]
