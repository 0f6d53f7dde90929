"""The board as one HTML page: a table of runs, each run's loss and learning-rate curves, and its eval tables
with a chart of each benchmark's headline metric per checkpoint. Charts are inline SVG drawn here (no script,
nothing loaded from elsewhere); every string from a file is escaped."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from road_vlm.board.runs import Board, EvalResult, Run
from road_vlm.eval.benchmarks import HEADLINE, headline

STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 1em auto; padding: 0 .8em; color: #1d2329; }
h1 { font-size: 1.35em; } h2 { font-size: 1.15em; margin-top: 1.6em; word-break: break-all; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
th, td { border: 1px solid #ccd3da; padding: .25em .5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.scroll { overflow-x: auto; max-width: 100%; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
svg { max-width: 100%; height: auto; background: #fafbfc; border: 1px solid #e1e6ea; }
.muted { color: #5b6875; font-size: .9em; }
.problems { color: #a40000; }
"""
_COLORS = ("#2f6fb3", "#c05621", "#2f855a", "#805ad5", "#b83280")


def _number(value: Any, fmt: str = "{:,}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _gib(value: Any) -> str:
    return f"{value / 2 ** 30:.2f} GiB" if isinstance(value, (int, float)) else "–"


def line_chart(title: str, series: list[tuple[str, list[float], list[float]]], *, x_label: str,
               y_label: str, y_range: tuple[float, float] | None = None, width: int = 380, height: int = 200) -> str:
    """An SVG line chart (one polyline per series, markers when there are few points); ``y_range`` fixes the
    y axis (scores: 0-100), else it spans the data."""
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    label = escape(f"{title}: {y_label} over {x_label}")
    if not points:
        return f'<svg role="img" aria-label="{label}" width="{width}" height="{height}"></svg>'
    left, right, top, bottom = 52, 12, 24, 34
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = y_range or (min(p[1] for p in points), max(p[1] for p in points))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg role="img" aria-label="{label}" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{label}</title>',
             f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="12">{escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#889"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#889"/>']
    for value in (y0, y1):
        parts.append(f'<text x="{left - 4}" y="{sy(value) + 4:.1f}" text-anchor="end" font-size="10">'
                     f'{value:.3g}</text>')
    for value in (x0, x1):
        parts.append(f'<text x="{sx(value):.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="10">'
                     f'{value:g}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle" font-size="10">{escape(x_label)}'
                 f' · {escape(y_label)}</text>')
    for index, (name, xs, ys) in enumerate(series):
        color = _COLORS[index % len(_COLORS)]
        pts = [(sx(x), sy(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        parts.append(f'<polyline class="series" data-name="{escape(name)}" data-points="{len(pts)}" fill="none" '
                     f'stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        if len(pts) <= 30:
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
    parts.append("</svg>")
    return "".join(parts)


def _runs_table(runs: list[Run]) -> str:
    rows = []
    for index, run in enumerate(runs):
        s = run.summary
        adapter = run.config.get("adapter", {}) if isinstance(run.config, dict) else {}
        memory = s.get("peak_memory", {}) or {}
        device = memory.get("device_peak_allocated_bytes")
        rows.append(
            f'<tr><td><a href="#run-{index}">{escape(str(run.path))}</a></td>'
            f"<td>{escape(str(adapter.get('variant', '–')))}</td>"
            f"<td>{_number(s.get('global_step'))}</td>"
            f"<td>{_number(s.get('trainable_parameters'))} ({_number(s.get('trainable_percent'), '{:.4f}')}%)</td>"
            f"<td>{_number(s.get('train_seconds'), '{:.1f}')} s</td>"
            f"<td>{_gib(memory.get('host_peak_rss_bytes'))}</td><td>{_gib(device)}</td>"
            f"<td>{_number(s.get('first_loss'), '{:.4f}')} → {_number(s.get('last_loss'), '{:.4f}')}</td>"
            f"<td>{len(run.evals)}</td></tr>")
    return ('<div class="scroll"><table id="runs"><thead><tr><th>run</th><th>variant</th><th>steps</th>'
            "<th>trainable parameters</th><th>train time</th><th>peak host RSS</th><th>peak device memory</th>"
            f"<th>loss first → last</th><th>evals</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _eval_section(result: EvalResult) -> str:
    results = result.results
    benchmarks = [b for b in results.get("benchmarks", []) if b in HEADLINE]
    steps = result.steps()
    head = "".join(f"<th>{escape(HEADLINE[b][0])}</th>" for b in benchmarks)
    body = []
    for row, scores in results["rows"].items():
        cells = "".join(f"<td>{_number(_metric(b, scores), '{:.2f}')}</td>" for b in benchmarks)
        body.append(f"<tr><td>{escape(row)}</td>{cells}</tr>")
    counts = ", ".join(f"{escape(HEADLINE[b][0])} {results.get('num_questions', {}).get(b, '?')}" for b in benchmarks)
    note = " (subset)" if results.get("limit") is not None else ""
    charts = []
    stepped = [(row, step) for row, step in steps.items() if step is not None]
    if "base" in results["rows"]:
        stepped.insert(0, ("base", 0))  # the untuned base is step 0 of every curve
    for b in benchmarks:
        xs = [float(step) for _, step in stepped]
        ys = [_metric(b, results["rows"][row]) for row, _ in stepped]
        series = [(HEADLINE[b][0], xs, [y if y is not None else math.nan for y in ys])]
        charts.append(line_chart(HEADLINE[b][0], series, x_label="step (0: base)", y_label="score (%)",
                                 y_range=(0, 100)))
    return (f'<section class="eval"><h3>eval: {escape(str(result.path))}{note}</h3>'
            f'<p class="muted">questions: {counts}</p>'
            f'<div class="scroll"><table class="eval-table"><thead><tr><th>checkpoint</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
            f'<div class="charts">{"".join(charts)}</div></section>')


def _metric(benchmark: str, scores: Any) -> float | None:
    try:
        return headline(benchmark, scores[benchmark])
    except (KeyError, TypeError, ValueError):
        return None


def _smooth(values: list[float], weight: float) -> list[float]:
    out, last = [], None
    for value in values:
        last = value if last is None or not math.isfinite(last) else weight * last + (1 - weight) * value
        out.append(last)
    return out


def _run_section(index: int, run: Run) -> str:
    steps = [float(h["step"]) for h in run.history if "step" in h]
    loss = [float(h.get("loss", math.nan)) for h in run.history if "step" in h]
    lr = [float(h.get("lr", math.nan)) for h in run.history if "step" in h]
    loss_series = [("loss", steps, loss)]
    if len(loss) > 50:  # noisy per-step losses: an exponential moving average as TensorBoard draws it
        loss_series.append(("smoothed", steps, _smooth(loss, 0.95)))
    charts = (line_chart("training loss", loss_series, x_label="step", y_label="loss")
              + line_chart("learning rate", [("lr", steps, lr)], x_label="step", y_label="lr"))
    data = run.summary.get("data", {}) or {}
    facts = (f"{_number(data.get('num_samples'))} samples ({_number(data.get('num_dropped'))} dropped), "
             f"global batch {_number(run.summary.get('global_batch'))}, world size "
             f"{_number(run.summary.get('world_size'))}, ZeRO-{_number(run.summary.get('zero_stage'))}")
    evals = "".join(_eval_section(e) for e in run.evals) or '<p class="muted">no eval results for this run</p>'
    return (f'<section class="run" id="run-{index}"><h2>{escape(str(run.path))}</h2><p class="muted">{facts}</p>'
            f'<div class="charts">{charts}</div>{evals}</section>')


def render(board: Board, roots: list[str]) -> str:
    where = ", ".join(escape(r) for r in roots)
    sections = [f"<h1>road_vlm board</h1><p class=\"muted\">runs and eval results under {where} "
                "(read-only; reload for new ones)</p>"]
    if board.runs:
        sections.append(_runs_table(board.runs))
        sections += [_run_section(i, run) for i, run in enumerate(board.runs)]
    else:
        sections.append('<p>No training runs found (a run is a folder with the summary.json the trainer writes '
                        "at the end).</p>")
    if board.evals:
        sections.append("<h2>Other eval results</h2>" + "".join(_eval_section(e) for e in board.evals))
    if board.problems:
        items = "".join(f"<li>{escape(p)}</li>" for p in board.problems)
        sections.append(f'<h2>Skipped files</h2><ul class="problems">{items}</ul>')
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1"><title>road_vlm board</title>'
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
