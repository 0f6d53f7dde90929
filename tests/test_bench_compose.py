"""scripts/bench_compose.py: the paired bootstrap behind its intervals (fast, no model), and its quick mode end to
end (slow: trains, composes, merges with PEFT, evaluates and reports every row)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from _compose_stats import Bootstrap, difference, done_when, question_scores, share_of_gain  # noqa: E402


def test_identical_rows_give_a_degenerate_interval():
    scores = np.random.default_rng(0).integers(0, 2, size=500).astype(float)
    boot = Bootstrap({"base": scores, "a": scores.copy()}, resamples=300, seed=0)
    assert boot.interval(difference("a", "base")) == {"point": 0.0, "lo": 0.0, "hi": 0.0}


def test_a_composed_row_equal_to_the_single_keeps_exactly_all_of_the_gain():
    base = np.zeros(400)
    single = (np.arange(400) % 2).astype(float)  # gains 50 points
    boot = Bootstrap({"base": base, "single": single, "composed": single.copy()}, resamples=300, seed=0)
    assert boot.interval(share_of_gain("composed", "single", "base")) == {"point": 100.0, "lo": 100.0, "hi": 100.0}


def test_a_known_shift_lies_inside_its_interval_and_the_pairing_narrows_it():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, size=1000).astype(float)
    shifted = base.copy()
    shifted[np.flatnonzero(base == 0)[:100]] = 1.0  # exactly +10 points, on the same questions
    boot = Bootstrap({"base": base, "shifted": shifted}, resamples=2000, seed=0)
    paired = boot.interval(difference("shifted", "base"))
    assert paired["lo"] <= 10.0 == paired["point"] <= paired["hi"]
    # An unpaired comparison of the same two means (each row resampled on its own) is much wider.
    unpaired = np.percentile(100 * (shifted[rng.integers(0, 1000, (2000, 1000))].mean(1)
                                    - base[rng.integers(0, 1000, (2000, 1000))].mean(1)), [2.5, 97.5])
    assert paired["hi"] - paired["lo"] < 0.6 * (unpaired[1] - unpaired[0])


def test_a_share_of_no_gain_is_undefined_and_undefined_resamples_are_counted():
    base = np.zeros(50)
    assert Bootstrap({"base": base, "s": base, "c": base}, 100, 0).interval(share_of_gain("c", "s", "base")) == {
        "point": None, "lo": None, "hi": None}
    single = np.zeros(50)
    single[0] = 1.0  # one question: many resamples leave it out, so the gain there is 0
    result = Bootstrap({"base": base, "s": single, "c": single}, 200, 0).interval(share_of_gain("c", "s", "base"))
    assert result["point"] == 100.0 and 0 < result["undefined_resamples"] < 200


def test_done_when_needs_the_lower_bound_and_the_singles_bar_on_every_seed():
    kept = {"point": 95.0, "lo": 85.0, "hi": 104.0}
    single = {"own_gain_kept": {"point": 97.0, "lo": 90.0, "hi": 103.0},
              "drift_on_other_task": {"point": -1.0, "lo": -2.5, "hi": 0.4}}
    good = {"retention": {"shapes": kept, "text": kept}, "singles": {"shapes": single, "text": single}}
    assert done_when({"seed0": good, "seed1": good}) == {"met": True, "failures": []}
    low = {**good, "retention": {"shapes": kept, "text": {"point": 92.0, "lo": 75.0, "hi": 101.0}}}
    drifting = {**single, "drift_on_other_task": {"point": 4.0, "lo": 2.0, "hi": 6.0}}
    verdict = done_when({"seed0": {**good, "singles": {"shapes": drifting, "text": single}}, "seed1": low})
    assert verdict == {"met": False, "failures": ["seed0: shapes single moves the text task by 4.0 pts [2.0, 6.0]",
                                                  "seed1: composed keeps 92% [75, 101] of the text gain"]}


@pytest.mark.parametrize("benchmark", ["gqa", "textvqa"])
def test_per_question_scores_average_to_the_benchmarks_own_score(tmp_path, benchmark):
    from road_vlm.demo.synthetic import generate_eval_data
    from road_vlm.eval.benchmarks import get_benchmark
    from road_vlm.eval.common import read_json

    root = generate_eval_data(tmp_path / "data", num_per_benchmark=6)
    module = get_benchmark(benchmark)
    questions = module.load(root, check_files=False)
    annotations = read_json(root / module.ANNOTATION_FILE, "annotations")
    if benchmark == "gqa":
        right = [annotations[q.key]["answer"] for q in questions]
    else:
        by_pair = module.load_annotations(root)
        right = [by_pair[(q.key, module.question_from_prompt(q.prompt))][0] for q in questions]
    rows = [{"question_id": q.question_id, "prompt": q.prompt, "text": answer if i % 2 == 0 else "wrong"}
            for i, (q, answer) in enumerate(zip(questions, right))]
    (tmp_path / "row" / benchmark).mkdir(parents=True)
    (tmp_path / "row" / benchmark / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    accuracy = module.score(rows, root)["accuracy"]
    scores = question_scores(tmp_path, root, "row", benchmark, accuracy)
    assert 0 < accuracy < 100 and len(scores) == len(questions) and scores[0] > 0 and scores[1] == 0
    with pytest.raises(RuntimeError, match="scorer reported"):
        question_scores(tmp_path, root, "row", benchmark, accuracy + 1)


@pytest.mark.slow
def test_bench_compose_quick_trains_every_quick_recipe_and_reports_intervals(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "scripts/bench_compose.py", "--quick", "--workdir", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])  # DeepSpeed may print a line before the report
    recipes = ("independent", "cotrained", "sequential")
    rows = {"base", "lora_shapes", "lora_text", "lora_cat", "lora_ties",
            *(f"{r}_{part}" for r in recipes for part in ("shapes", "text", "composed"))}
    assert set(report["accuracy"]) == {"seed0"} and set(report["accuracy"]["seed0"]) == rows
    assert set(report["methods"]) == {*recipes, "lora_cat", "lora_ties"} == set(report["done_when"])
    assert "lora_cotrained" in report["left_out"]
    intervals = []
    for by_seed in report["methods"].values():
        fig = by_seed["seed0"]
        for task in ("shapes", "text"):
            single = fig["singles"][task]
            intervals += [fig["retention"][task], single["own_gain_kept"], single["drift_on_other_task"]]
    for value in intervals:
        assert set(value) >= {"point", "lo", "hi"}
        if value["point"] is not None:
            assert value["lo"] <= value["point"] <= value["hi"], value
    drifts = [fig["seed0"]["singles"][t]["drift_on_other_task"] for fig in report["methods"].values() for t in
              ("shapes", "text")]
    assert all(d["point"] is not None for d in drifts)  # a difference is always defined
    assert (tmp_path / "compose-quick" / "bench_compose.md").is_file()
