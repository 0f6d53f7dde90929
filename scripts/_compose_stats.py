"""What bench_compose.py reports, from each question up: every row's score on every GQA and TextVQA question (read
back from its predictions file with the benchmarks' own scoring rules), a paired bootstrap over questions that puts
a 95 % percentile interval on every gain, drift and retention figure, the issue's "done when" verdict, and the
markdown tables.

Paired: one set of resampled question indices per benchmark, shared by every row (and seed), so a figure that
compares two rows sees the same questions for both and the rows' shared difficulty cancels out."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from road_vlm.eval import gqa, textvqa
from road_vlm.eval.common import qid_key, read_json
from road_vlm.eval.predictions import read_predictions
from road_vlm.eval.vqa_normalize import vqa_accuracy
from road_vlm.filenames import PREDICTIONS

TASKS = {"shapes": "gqa", "text": "textvqa"}  # task -> the benchmark that measures it
OTHER = {"shapes": "text", "text": "shapes"}
BENCHMARK_NAMES = {"gqa": "GQA", "textvqa": "TextVQA"}
Means = dict[str, np.ndarray]  # row -> its mean score in points: a 0-d array (all questions) or one per resample
Statistic = Callable[[Means], np.ndarray]


def gqa_scores(row_dir: Path, data_root: Path) -> np.ndarray:
    """1/0 per balanced GQA question (question-file order): GQA's exact match after LLaVA's normalisation."""
    annotations = {qid_key(k): v for k, v in read_json(data_root / gqa.ANNOTATION_FILE, "GQA annotations").items()}
    answers = {qid_key(r["question_id"]): str(r["text"]) for r in read_predictions(row_dir / "gqa" / PREDICTIONS)}
    keys = [q.key for q in gqa.load(data_root, check_files=False) if annotations[q.key].get("isBalanced", False)]
    return np.array([gqa.normalize_prediction(answers[k]) == annotations[k]["answer"] for k in keys], dtype=float)


def textvqa_scores(row_dir: Path, data_root: Path) -> np.ndarray:
    """VQA soft accuracy (0 to 1) per TextVQA question (question-file order), matched as LLaVA's scorer does: by
    image id and the question read back from the recorded prompt."""
    annotations = textvqa.load_annotations(data_root)
    answers = {(qid_key(r["question_id"]), textvqa.question_from_prompt(str(r["prompt"]))): str(r["text"])
               for r in read_predictions(row_dir / "textvqa" / PREDICTIONS)}
    pairs = [(q.key, textvqa.question_from_prompt(q.prompt)) for q in textvqa.load(data_root, check_files=False)]
    return np.array([vqa_accuracy(answers[p], annotations[p]) for p in pairs], dtype=float)


SCORERS = {"gqa": gqa_scores, "textvqa": textvqa_scores}


def question_scores(eval_dir: Path, data_root: Path, row: str, benchmark: str, accuracy: float) -> np.ndarray:
    """One row's per-question scores on one benchmark, checked against the accuracy ``evaluate`` reported (so the
    bootstrap resamples exactly what the table shows)."""
    scores = SCORERS[benchmark](eval_dir / row, data_root)
    if abs(100.0 * scores.mean() - accuracy) > 1e-6:
        raise RuntimeError(f"{row}/{benchmark}: per-question scores average {100 * scores.mean():.4f}, but the "
                           f"benchmark's scorer reported {accuracy:.4f}")
    return scores


class Bootstrap:
    """Every row's mean score (points) on one benchmark's questions, and on each of ``resamples`` resamples of
    them; the same ``seed`` draws the same resamples, so objects built for different seeds stay paired."""

    def __init__(self, scores: dict[str, np.ndarray], resamples: int, seed: int) -> None:
        sizes = {len(s) for s in scores.values()}
        if len(sizes) != 1:
            raise ValueError(f"every row must score the same questions, got sizes {sorted(sizes)}")
        size = sizes.pop()
        indices = np.random.default_rng(seed).integers(0, size, size=(resamples, size))
        self.point = {row: np.asarray(100.0 * s.mean()) for row, s in scores.items()}
        self.samples = {row: 100.0 * s[indices].mean(axis=1) for row, s in scores.items()}

    def interval(self, statistic: Statistic, level: float = 0.95) -> dict[str, float | int | None]:
        """``statistic`` on all questions (the point) and its percentile interval over the resamples. A statistic
        undefined (NaN: a share of no gain) on all questions has no interval; resamples where it is undefined are
        left out of the percentiles and counted."""
        point = float(statistic(self.point))
        if np.isnan(point):
            return {"point": None, "lo": None, "hi": None}
        samples = statistic(self.samples)
        defined = samples[~np.isnan(samples)]
        tail = 100.0 * (1.0 - level) / 2.0
        out: dict[str, float | int | None] = {"point": round(point, 1), "lo": None, "hi": None}
        if defined.size:
            lo, hi = np.percentile(defined, [tail, 100.0 - tail])
            out.update(lo=round(float(lo), 1), hi=round(float(hi), 1))
        if defined.size < samples.size:
            out["undefined_resamples"] = int(samples.size - defined.size)
        return out


def difference(row: str, base: str) -> Statistic:
    """Points ``row`` scores above ``base``."""
    return lambda m: m[row] - m[base]


def share_of_gain(row: str, reference: str, base: str) -> Statistic:
    """``row``'s gain over ``base`` as a percentage of ``reference``'s gain; NaN where the reference gains nothing."""
    def statistic(m: Means) -> np.ndarray:
        gain = m[reference] - m[base]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gain > 0, 100.0 * (m[row] - m[base]) / gain, np.nan)
    return statistic


def figures(method: dict, boot: dict[str, Bootstrap]) -> dict:
    """Retention of each gain by the composed model; own gain kept and cross-task drift of each single adapter."""
    out: dict[str, dict] = {"retention": {}, "singles": {}}
    for task, benchmark in TASKS.items():
        single, reference = method["singles"][task], method["reference"][task]
        other = TASKS[OTHER[task]]
        out["retention"][task] = boot[benchmark].interval(share_of_gain(method["composed"], reference, "base"))
        out["singles"][task] = {"own_gain_kept": boot[benchmark].interval(share_of_gain(single, reference, "base")),
                                "drift_on_other_task": boot[other].interval(difference(single, "base"))}
    return out


def done_when(by_seed: dict[str, dict]) -> dict:
    """The issue's bar: on every seed the composed model keeps >= 90 % of each gain with the interval's lower bound
    >= 80 %, and each single adapter keeps >= 90 % of its own independent gain and moves the other task <= 3 points."""
    failures = []
    for seed, fig in by_seed.items():
        for task in TASKS:
            kept, single = fig["retention"][task], fig["singles"][task]
            if kept["point"] is None or kept["point"] < 90 or kept["lo"] is None or kept["lo"] < 80:
                failures.append(f"{seed}: composed keeps {_cell(kept, '%')} of the {task} gain")
            if single["own_gain_kept"]["point"] is None or single["own_gain_kept"]["point"] < 90:
                failures.append(f"{seed}: {task} single keeps {_cell(single['own_gain_kept'], '%')} of its gain")
            if abs(single["drift_on_other_task"]["point"]) > 3:
                failures.append(f"{seed}: {task} single moves the {OTHER[task]} task by "
                                f"{_cell(single['drift_on_other_task'], ' pts')}")
    return {"met": not failures, "failures": failures}


def _cell(value: dict, unit: str) -> str:
    """``93% [85, 101]`` or ``-1.5 pts [-3.0, 0.2]``."""
    if value["point"] is None:
        return "n/a (no gain)"
    digits = 1 if unit == " pts" else 0
    bounds = "" if value["lo"] is None else f" [{value['lo']:.{digits}f}, {value['hi']:.{digits}f}]"
    return f"{value['point']:.{digits}f}{unit}{bounds}"


def markdown(result: dict) -> str:
    """bench_compose.md: accuracy per seed, retention, the single adapters' figures, the verdicts and notes."""
    tasks = [f"{BENCHMARK_NAMES[b]} ({t})" for t, b in TASKS.items()]
    lines = []
    for seed, table in result["accuracy"].items():
        lines += [f"Accuracy, {seed}:", "", f"| model | {' | '.join(tasks)} |", "|---|---:|---:|"]
        lines += [f"| {row} | {scores['shapes']:.1f} | {scores['text']:.1f} |" for row, scores in table.items()]
        lines.append("")
    lines += ["Retention of each single adapter's gain by the composed model (95 % paired-bootstrap interval; gains "
              "of the independent recipe's singles, LoRA's for the LoRA merges):", "",
              "| method | seed | keeps the shapes gain (GQA) | keeps the text gain (TextVQA) |", "|---|---|---:|---:|"]
    for method, by_seed in result["methods"].items():
        for seed, fig in by_seed.items():
            lines.append(f"| {method} | {seed} | {_cell(fig['retention']['shapes'], '%')} | "
                         f"{_cell(fig['retention']['text'], '%')} |")
    lines += ["", "Single adapters: share of the independent gain kept, and drift on the other task (points):", "",
              "| method | seed | shapes: gain kept | shapes: TextVQA drift | text: gain kept | text: GQA drift |",
              "|---|---|---:|---:|---:|---:|"]
    for method, by_seed in result["methods"].items():
        for seed, fig in by_seed.items():
            cells = [_cell(fig["singles"][t][k], u) for t in TASKS
                     for k, u in (("own_gain_kept", "%"), ("drift_on_other_task", " pts"))]
            lines.append(f"| {method} | {seed} | {' | '.join(cells)} |")
    lines += ["", "Done when (>= 90 % of both gains, lower bound >= 80 %, on every seed; singles keep >= 90 % and "
              "drift <= 3 points):", ""]
    for method, verdict in result["done_when"].items():
        lines.append(f"- {method}: " + ("met" if verdict["met"] else "not met: " + "; ".join(verdict["failures"])))
    lines += ["", *(f"- left out, {k}: {v}" for k, v in result["left_out"].items()),
              *(f"- {k}: {v}" for k, v in result["notes"].items())]
    return "\n".join(lines)
