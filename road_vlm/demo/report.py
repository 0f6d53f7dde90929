"""The demo's before/after table (markdown) and chart (``before_after.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from road_vlm.eval.benchmarks import HEADLINE
from road_vlm.eval.benchmarks import headline as headline_metric


def headline(row: dict[str, Any]) -> dict[str, float]:
    """{benchmark label: headline metric} of one eval row, in the LLaVA-1.5 paper's order."""
    return {label: headline_metric(bench, row[bench]) for bench, (label, _) in HEADLINE.items() if bench in row}


def pope_balance(row: dict[str, Any]) -> dict[str, float]:
    """POPE accuracy and yes-ratio, averaged over its three categories: F1 alone rewards answering "yes" to
    everything (66.7), so these two show whether a model looks at the image."""
    categories = [metrics for metrics in row["pope"].values() if isinstance(metrics, dict)]
    return {key: round(sum(m[key] for m in categories) / len(categories), 1) for key in ("accuracy", "yes_ratio")}


def before_after_table(base: dict[str, float], tuned: dict[str, float]) -> str:
    lines = ["| benchmark | base (untuned) | RoAd4 tuned | change |", "|---|---:|---:|---:|"]
    for label in base:
        lines.append(f"| {label} | {base[label]:.1f} | {tuned[label]:.1f} | {tuned[label] - base[label]:+.1f} |")
    return "\n".join(lines)


def before_after_chart(base: dict[str, float], tuned: dict[str, float], path: Path, *,
                       num_questions: dict[str, int]) -> Path:
    """Grouped bars, base vs tuned, one pair per benchmark (x labels carry the number of questions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(base)
    counts = {HEADLINE[bench][0]: n for bench, n in num_questions.items() if bench in HEADLINE}
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, values, name, color in ((-width / 2, base, "base (untuned)", "#9aa5b1"),
                                         (width / 2, tuned, "RoAd4 tuned", "#2f6fb3")):
        bars = ax.bar([x + offset for x in xs], [values[label] for label in labels], width, label=name, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(list(xs), [f"{label}\n({counts.get(label, '?')} q)" for label in labels])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.set_title("road_vlm demo: before and after RoAd4 tuning")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
