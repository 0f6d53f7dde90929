"""Generation with a tiny real LLaVA: batch-size independence, kill-and-resume, sharding, and
end-to-end evaluate() / CLI on the synthetic benchmarks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from road_vlm.demo.synthetic import generate_eval_data
from road_vlm.eval import evaluate, gqa, pope, scienceqa, textvqa
from road_vlm.eval.benchmarks import BENCHMARKS
from road_vlm.eval.commands import register
from road_vlm.eval.common import EvalQuestion
from road_vlm.eval.predictions import merge, read_predictions
from road_vlm.eval.runner import answer_batch, run_benchmark
from road_vlm.model import load_vlm
from road_vlm.filenames import PREDICTIONS

NEW_TOKENS = 4  # an untrained model never stops by itself; keep generation short


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_eval_data(tmp_path_factory.mktemp("evaldata"), seed=5, num_per_benchmark=4)


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir: Path):
    return load_vlm(tiny_llava_dir)


@pytest.fixture(scope="module")
def mixed_questions(data_root: Path) -> list[EvalQuestion]:
    """Text-only and image questions, square and non-square images, different prompt lengths, and TextVQA
    questions that share a question_id (LLaVA's file uses the image id)."""
    qs = scienceqa.load(data_root) + pope.load(data_root)[:3] + gqa.load(data_root)[:2] + textvqa.load(data_root)[:3]
    assert any(q.image is None for q in qs) and any(q.image is not None for q in qs)
    assert len({q.key for q in qs}) < len(qs)
    return [dataclasses.replace(q, max_new_tokens=NEW_TOKENS) for q in qs]


@pytest.fixture(scope="module")
def reference(loaded, mixed_questions: list[EvalQuestion], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ref")
    run_benchmark(loaded, mixed_questions, out, model_id="tiny", batch_size=len(mixed_questions), progress=False)
    return read_predictions(out / PREDICTIONS)


def _texts(rows: list[dict]) -> list[tuple]:
    return [(r["question_id"], r["prompt"], r["text"]) for r in rows]


def test_answers_file_uses_llava_format(reference: list[dict], mixed_questions: list[EvalQuestion]) -> None:
    assert [r["question_id"] for r in reference] == [q.question_id for q in mixed_questions]
    for row, q in zip(reference, mixed_questions):
        assert set(row) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert row["prompt"] == q.prompt and row["model_id"] == "tiny" and row["metadata"] == {}
        assert row["text"] == row["text"].strip() and "<image>" not in row["text"] and "</s>" not in row["text"]


def test_generation_strips_the_prompt(loaded, mixed_questions: list[EvalQuestion]) -> None:
    texts, generated = answer_batch(loaded, mixed_questions[:2])
    assert len(texts) == 2 and 0 < generated <= 2 * NEW_TOKENS
    assert not any(t.startswith("A chat between") or "ASSISTANT" in t for t in texts)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_predictions_do_not_depend_on_batch_size(loaded, mixed_questions, reference, tmp_path: Path, batch_size: int) -> None:
    run_benchmark(loaded, mixed_questions, tmp_path, model_id="tiny", batch_size=batch_size, progress=False)
    assert _texts(read_predictions(tmp_path / PREDICTIONS)) == _texts(reference)


def test_kill_and_resume_equals_one_run(loaded, mixed_questions, reference, tmp_path: Path) -> None:
    # A first run that got through 4 questions, then died while writing the next batch.
    run_benchmark(loaded, mixed_questions[:4], tmp_path, model_id="tiny", batch_size=2, progress=False)
    path = tmp_path / PREDICTIONS
    with path.open("a") as handle:
        handle.write('{"question_id": "half-writ')
    answered = run_benchmark(loaded, mixed_questions, tmp_path, model_id="tiny", batch_size=2, progress=False)
    assert answered == len(mixed_questions) - 4
    assert _texts(read_predictions(path)) == _texts(reference)
    assert run_benchmark(None, mixed_questions, tmp_path, model_id="tiny", progress=False) == 0


def test_two_ranks_equal_one_process(loaded, mixed_questions, reference, tmp_path: Path) -> None:
    for rank in (1, 0):  # order does not matter
        run_benchmark(loaded, mixed_questions, tmp_path, model_id="tiny", batch_size=2, rank=rank, world_size=2,
                      progress=False)
    assert not (tmp_path / PREDICTIONS).exists()
    merge(tmp_path, mixed_questions)
    assert _texts(read_predictions(tmp_path / PREDICTIONS)) == _texts(reference)


def _make_checkpoints(base: Path, run: Path) -> list[Path]:
    from road_vlm.adapters import AdapterConfig, add_adapter, save_adapter

    paths = []
    for step in (10, 20):
        model = load_vlm(base).model
        add_adapter(model, AdapterConfig(variant="road1", group_size=8))
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn(p.shape, generator=gen))
        path = run / f"checkpoint-{step}"
        save_adapter(model, path)
        paths.append(path)
    return paths


def test_evaluate_end_to_end_on_synthetic_benchmarks(tiny_llava_dir: Path, data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _make_checkpoints(tiny_llava_dir, run)
    out = tmp_path / "out"
    results = evaluate(tiny_llava_dir, [run], "gqa,scienceqa,textvqa,pope", data_root, out, batch_size=4,
                       limit=3, max_new_tokens=NEW_TOKENS, progress=False)
    assert list(results["rows"]) == ["checkpoint-10", "checkpoint-20"]
    assert results["checkpoints"] == {"checkpoint-10": str(run / "checkpoint-10"), "checkpoint-20": str(run / "checkpoint-20")}
    assert results["complete"] is False and results["limit"] == 3
    assert results["num_questions"] == {b: 3 for b in BENCHMARKS}
    for row_name, scores in results["rows"].items():
        assert set(scores) == set(BENCHMARKS)
        for name in BENCHMARKS:
            rows = read_predictions(out / row_name / name / PREDICTIONS)
            assert len(rows) == 3 and all(r["model_id"] == row_name for r in rows)
            assert BENCHMARKS[name].score(rows, data_root, limit=3) == scores[name]
        assert 0.0 <= scores["pope"]["f1_mean"] <= 100.0
    # The two checkpoints really are different models.
    a, b = (read_predictions(out / n / "gqa" / PREDICTIONS) for n in ("checkpoint-10", "checkpoint-20"))
    assert [r["text"] for r in a] != [r["text"] for r in b]
    assert json.loads((out / "results.json").read_text()) == results
    md = (out / "results.md").read_text()
    assert "| checkpoint-20 |" in md and "| LLaVA-1.5-7B (LoRA, paper) | 63.0 | 68.4 | 58.2 | 86.4 |" in md
    assert "Subset only" in md and (out / "results.png").stat().st_size > 0
    # A rerun answers nothing new and reports the same numbers.
    again = evaluate(tiny_llava_dir, [run], "gqa,scienceqa,textvqa,pope", data_root, out, limit=3,
                     max_new_tokens=NEW_TOKENS, progress=False)
    assert again == results


def _llava_eval_textvqa(data_root: Path, answers: list[dict]) -> float:
    """LLaVA's llava/eval/eval_textvqa.py + m4c TextVQAAccuracyEvaluator, transcribed: annotations keyed by
    (image_id, question.lower()), each answer matched by (question_id, question recovered from its prompt), soft
    accuracy averaged over the 10 leave-one-out subsets of the human answers."""
    from road_vlm.eval.vqa_normalize import normalize_answer

    data = json.loads((data_root / textvqa.ANNOTATION_FILE).read_text())["data"]
    annotations = {(a["image_id"], a["question"].lower()): a for a in data}
    scores = []
    for result in answers:
        gt = [normalize_answer(a) for a in annotations[(result["question_id"],
                                                        textvqa.question_from_prompt(result["prompt"]))]["answers"]]
        pred = normalize_answer(result["text"])
        accs = [min(1.0, sum(1 for j, other in enumerate(gt) if j != i and other == pred) / 3) for i in range(len(gt))]
        scores.append(sum(accs) / len(accs))
    return 100.0 * sum(scores) / len(scores)


def test_eval_textvqa_with_shared_question_ids_matches_score_and_llavas_scorer(
    tiny_llava_dir: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    questions = textvqa.load(data_root)
    assert len({q.key for q in questions}) < len(questions)  # the real file's quirk is in the layout
    out = tmp_path / "out"
    results = evaluate(tiny_llava_dir, None, "textvqa", data_root, out, batch_size=2, max_new_tokens=NEW_TOKENS,
                       progress=False)
    rows = read_predictions(out / "base" / "textvqa" / PREDICTIONS)
    assert [(r["question_id"], r["prompt"]) for r in rows] == [(q.question_id, q.prompt) for q in questions]
    # Give some answers the right word so the score is not trivially 0 (the untrained model's are gibberish).
    truth = {(a["image_id"], a["question"]): a["answers"][0]
             for a in json.loads((data_root / textvqa.ANNOTATION_FILE).read_text())["data"]}
    for row in rows[::2]:
        row["text"] = truth[(row["question_id"], textvqa.question_from_prompt(row["prompt"]).capitalize())]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))

    import argparse

    parser = argparse.ArgumentParser(prog="road-vlm")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["score", "--benchmark", "textvqa", "--data-root", str(data_root), "--predictions",
                              str(answers), "--json"])
    assert args.func(args) == 0
    scored = json.loads(capsys.readouterr().out)
    official = _llava_eval_textvqa(data_root, rows)
    assert official > 30.0
    assert scored["accuracy"] == pytest.approx(official)
    assert results["rows"]["base"]["textvqa"]["accuracy"] == pytest.approx(
        _llava_eval_textvqa(data_root, read_predictions(out / "base" / "textvqa" / PREDICTIONS)))


def test_sequential_ranks_equal_single_process(tiny_llava_dir: Path, data_root: Path, tmp_path: Path) -> None:
    kwargs = dict(benchmarks="pope,scienceqa", data_root=data_root, batch_size=3, max_new_tokens=NEW_TOKENS,
                  limit=5, progress=False)
    single = evaluate(tiny_llava_dir, None, output=tmp_path / "single", **kwargs)
    assert single["complete"] is False and single["max_new_tokens"] == NEW_TOKENS
    assert evaluate(tiny_llava_dir, None, output=tmp_path / "sharded", rank=0, world_size=2, **kwargs) == {}
    sharded = evaluate(tiny_llava_dir, None, output=tmp_path / "sharded", rank=1, world_size=2, **kwargs)
    assert sharded["rows"] == single["rows"]
    for name in ("pope", "scienceqa"):
        assert _texts(read_predictions(tmp_path / "sharded/base" / name / PREDICTIONS)) == \
            _texts(read_predictions(tmp_path / "single/base" / name / PREDICTIONS))
    # A smaller limit over existing answers needs no generation and scores only its subset.
    smaller = evaluate(None, None, output=tmp_path / "single", **{**kwargs, "limit": 2})  # type: ignore[arg-type]
    rows = read_predictions(tmp_path / "single/base/pope" / PREDICTIONS)
    assert len(rows) == 5 and smaller["rows"]["base"]["pope"] == pope.score(rows[:2], data_root, limit=2)


def test_score_cli_prints_percentages_as_json(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="road-vlm")
    register(parser.add_subparsers(dest="command"))
    labels = [json.loads(x) for x in (data_root / "pope/coco/coco_pope_random.json").read_text().splitlines()]
    questions = pope.load(data_root)
    answers = []
    positions: dict[str, int] = {}
    for q in questions:  # answer "yes" to everything except the first random negative
        i = positions.get(q.category, 0)
        positions[q.category] = i + 1
        first_random_no = q.category == "random" and labels[i]["label"] == "no" and \
            i == next(j for j, lab in enumerate(labels) if lab["label"] == "no")
        answers.append({"question_id": q.question_id, "prompt": q.prompt, "text": "No." if first_random_no else "Yes"})
    pred = tmp_path / "answers.jsonl"
    pred.write_text("".join(json.dumps(a) + "\n" for a in answers))
    args = parser.parse_args(["score", "--benchmark", "pope", "--data-root", str(data_root), "--predictions", str(pred), "--json"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"random", "popular", "adversarial", "f1_mean"}
    assert result["popular"] == {"accuracy": 50.0, "precision": 50.0, "recall": 100.0, "f1": pytest.approx(200 / 3),
                                 "yes_ratio": 100.0}
    # random: 4 questions, 2 yes; 3 "yes" answers, 1 correct "no": TP 2, FP 1, TN 1.
    assert result["random"]["accuracy"] == 75.0 and result["random"]["precision"] == pytest.approx(200 / 3)
    bad = tmp_path / "foreign.jsonl"
    bad.write_text(json.dumps({"question_id": 999, "prompt": "x", "text": "yes"}) + "\n")
    args = parser.parse_args(["score", "--benchmark", "pope", "--data-root", str(data_root), "--predictions", str(bad)])
    assert args.func(args) == 2
    assert "question_id 999" in capsys.readouterr().err


def test_eval_cli_writes_the_results_table(tiny_llava_dir: Path, data_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="road-vlm")
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["eval", "--model", str(tiny_llava_dir), "--benchmarks", "textvqa", "--data-root",
                              str(data_root), "--output", str(out), "--limit", "2", "--max-new-tokens", "2",
                              "--batch-size", "2", "--no-progress"])
    assert args.func(args) == 0
    assert "| base |" in capsys.readouterr().out
    assert len(read_predictions(out / "base/textvqa" / PREDICTIONS)) == 2
    (data_root / "textvqa/TextVQA_0.5.1_val.json").rename(tmp_path / "moved.json")
    try:
        args = parser.parse_args(["eval", "--model", str(tiny_llava_dir), "--benchmarks", "textvqa", "--data-root",
                                  str(data_root), "--output", str(tmp_path / "cli2"), "--limit", "2"])
        assert args.func(args) == 2
        assert "TextVQA_0.5.1_val.json: TextVQA annotation file not found" in capsys.readouterr().err
        assert not (tmp_path / "cli2").exists()  # failed before generating anything
    finally:
        (tmp_path / "moved.json").rename(data_root / "textvqa/TextVQA_0.5.1_val.json")


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(tiny_llava_dir: Path, data_root: Path, tmp_path: Path) -> None:
    script = (
        "import logging, sys; from road_vlm.eval import evaluate; logging.basicConfig(level=logging.INFO); "
        "evaluate(sys.argv[1], None, 'gqa,scienceqa', sys.argv[2], sys.argv[3], batch_size=2, max_new_tokens=4, "
        "progress=False)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                    "--no-python", sys.executable, "-c", script, str(tiny_llava_dir), str(data_root),
                    str(tmp_path / "dist")], check=True, env=env, timeout=600, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert "base/gqa: rank 0 of 2" in log and "base/gqa: rank 1 of 2" in log, log[-3000:]
    single = evaluate(tiny_llava_dir, None, "gqa,scienceqa", data_root, tmp_path / "single", batch_size=2,
                      max_new_tokens=4, progress=False)
    dist = json.loads((tmp_path / "dist/results.json").read_text())
    assert dist["rows"] == single["rows"]
    for name in ("gqa", "scienceqa"):
        assert _texts(read_predictions(tmp_path / "dist/base" / name / PREDICTIONS)) == \
            _texts(read_predictions(tmp_path / "single/base" / name / PREDICTIONS))
