"""results.json, results.md (benchmark x checkpoint table with the LLaVA-1.5-7B reference rows)
and results.png (each headline metric over checkpoints)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from road_vlm.eval.benchmarks import HEADLINE, REFERENCE_ROWS, headline


def write_results(output: Path, results: dict[str, Any]) -> list[Path]:
    """Write the three report files; returns their paths (the plot only with 2+ rows)."""
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / "results.json", output / "results.md"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(render_markdown(results), encoding="utf-8")
    if len(results["rows"]) > 1:
        paths.append(plot(results, output / "results.png"))
    return paths


def render_markdown(results: dict[str, Any]) -> str:
    benchmarks: list[str] = results["benchmarks"]
    header = "| Checkpoint | " + " | ".join(HEADLINE[b][0] for b in benchmarks) + " |"
    lines = [f"# Evaluation of `{results['model']}`", ""]
    if results.get("limit") is not None:
        lines += [f"**Subset only: the first {results['limit']} questions of each benchmark. These numbers are "
                  "not comparable with the paper rows.**", ""]
    if results.get("max_new_tokens") is not None:
        lines += [f"**Generation capped at {results['max_new_tokens']} new tokens (LLaVA-1.5 uses 128, ScienceQA "
                  "1024): not comparable with the paper rows.**", ""]
    lines += [header, "|" + "---|" * (len(benchmarks) + 1)]
    for name, scores in results["rows"].items():
        cells = [f"{headline(b, scores[b]):.2f}" for b in benchmarks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, ref in REFERENCE_ROWS.items():
        lines.append(f"| {name} | " + " | ".join(f"{ref[b]:.1f}" for b in benchmarks) + " |")
    lines += ["", "GQA: testdev-balanced accuracy. SQA-IMG: ScienceQA test accuracy on questions with an image. "
              "TextVQA: val VQA accuracy (prompts with OCR tokens). POPE: mean F1 over random/popular/adversarial.",
              ""]
    details = []
    for name, row in results["rows"].items():
        for b in benchmarks:
            scores = row[b]
            flat = ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if isinstance(v, (int, float)))
            nested = "; ".join(f"{k}: " + ", ".join(f"{m} {x:.2f}" for m, x in v.items())
                               for k, v in scores.items() if isinstance(v, dict))
            details.append(f"- {name} / {b} ({results['num_questions'][b]} questions): "
                           + "; ".join(x for x in (flat, nested) if x))
    return "\n".join(lines + ["## All metrics", ""] + details) + "\n"


def _step(name: str, index: int) -> float:
    match = re.search(r"checkpoint-(\d+)", name)
    return float(match.group(1)) if match else float(index)


def plot(results: dict[str, Any], path: Path) -> Path:
    """One panel per benchmark: the headline metric over checkpoints (x = training step when the
    row names are checkpoint-N, else the row index)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training/eval machines
    import matplotlib.pyplot as plt

    benchmarks = results["benchmarks"]
    names = list(results["rows"])
    xs = [_step(n, i) for i, n in enumerate(names)]
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(3.2 * len(benchmarks), 3.0), squeeze=False)
    for ax, b in zip(axes[0], benchmarks):
        ax.plot(xs, [headline(b, results["rows"][n][b]) for n in names], marker="o")
        ax.set_title(HEADLINE[b][0])
        steps = all("checkpoint-" in n for n in names)
        ax.set_xlabel("step" if steps else "row")
        if not steps:
            ax.set_xticks(xs, names, rotation=30, fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
