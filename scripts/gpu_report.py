#!/usr/bin/env python
"""Collect the stages of scripts/gpu_check.sh into ``<date>-<gpu>.json`` and ``.md``; exit 1 if a stage failed.

    python scripts/gpu_report.py --stages DIR --out benchmarks/results --seconds 312 [--dry-run]

DIR holds, per stage, ``NAME.status`` (``ok 12s`` / ``failed ...`` / ``timed out ...`` / ``skipped ...``),
``NAME.out`` (the stage's stdout: one JSON document for the environment and the benchmarks, pytest's output
for the tests) and ``NAME.err``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Any

STAGES = ("environment", "cuda-tests", "adapters", "adapters-graphs", "train", "serving")
# What a dry run on the CPU cannot run at all; gpu_check.sh records it as skipped, and that is not a failure there.
GPU_ONLY_SKIP = "skipped: needs a GPU"


def _json_document(text: str) -> Any:
    """The JSON document a benchmark printed (the whole stdout, or from its first line that opens one)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    return None


def read_stages(stages: Path, dry_run: bool = False) -> dict[str, dict[str, Any]]:
    out = {}
    for name in STAGES:
        status_file = stages / f"{name}.status"
        status = status_file.read_text().strip() if status_file.exists() else "not run"
        stdout = (stages / f"{name}.out").read_text() if (stages / f"{name}.out").exists() else ""
        stderr = (stages / f"{name}.err").read_text() if (stages / f"{name}.err").exists() else ""
        ok = status.startswith("ok") or (dry_run and status.startswith(GPU_ONLY_SKIP))
        entry: dict[str, Any] = {"status": status, "ok": ok}
        if name == "cuda-tests":
            summary = [line for line in stdout.splitlines() if re.search(r"\b(passed|failed|skipped|error)", line)]
            entry["summary"] = summary[-1].strip("= ") if summary else None
        else:
            entry["result"] = _json_document(stdout)
        if not status.startswith("ok"):
            entry["stderr_tail"] = stderr.splitlines()[-15:]
        out[name] = entry
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def _forward_table(adapters: dict[str, Any], title: str) -> list[str]:
    """bench_adapters.py's forward rows as a table (ms per call, and the time above the bare layer's matmul)."""
    lines = ["", f"{title} ({adapters.get('dtype')}; ms per call; overhead = time above the bare layer's matmul)", "",
             "| layer | shape | adapters | base ms | road_vlm RoAd4 ms (+%) | PEFT RoAd4 ms (+%) | PEFT LoRA r16 ms (+%) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in adapters.get("forward", []):
        failed = row.get("not_capturable", {})
        cells = [f"not capturable: {failed[k]}" if k in failed else
                 f"{_fmt(row.get(f'{k}_ms'))} ({_fmt(row.get(f'{k}_overhead_pct'))}%)"
                 for k in ("road_vlm_road4", "peft_road4", "peft_lora_r16")]
        lines.append(f"| {row['layer']} | {row['shape']} | {row['distinct_adapters']} | {_fmt(row['base_ms'])} | "
                     + " | ".join(cells) + " |")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    env = report["stages"]["environment"].get("result") or {}
    lines = [f"# GPU check {report['date']} — {report['gpu']}", "",
             f"`bash scripts/gpu_check.sh`{' --dry-run' if report['dry_run'] else ''}: {report['seconds']} s in all. "
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, transformers {env.get('transformers')}, "
             f"peft {env.get('peft')}.", "", "| stage | status |", "|---|---|"]
    lines += [f"| {name} | {stage['status']} |" for name, stage in report["stages"].items()]
    tests = report["stages"]["cuda-tests"]
    lines += ["", "## CUDA tests", "", f"`tests/adapters/test_cuda.py`: {tests.get('summary')}"]

    adapters = report["stages"]["adapters"].get("result")
    if adapters:
        lines += _forward_table(adapters, "## Adapter layer forward")
        if adapters.get("merge"):
            lines += ["", "| layer | road_vlm merge ms | PEFT merge ms | speed-up |", "|---|---:|---:|---:|"]
            lines += [f"| {m['layer']} | {_fmt(m['road_vlm_merge_ms'])} | {_fmt(m['peft_merge_ms'])} | {m['speedup']}× |"
                      for m in adapters["merge"]]

    graphed = report["stages"]["adapters-graphs"].get("result")
    if graphed:
        lines += _forward_table(graphed, "## Adapter layer forward inside CUDA graphs")

    train = report["stages"]["train"].get("result")
    if train:
        lines += ["", f"## Training step ({train.get('preset')} preset, {train.get('num_layers') or 'all'} LM layers, "
                      f"batch {train.get('batch_size')} × {train.get('seq_len')} tokens, {train.get('dtype')})", "",
                  "| method | trainable params | step s (median) | peak memory GiB |", "|---|---:|---:|---:|"]
        for row in train.get("results", []):
            if "error" in row:
                lines.append(f"| {row['method']} | error: {' '.join(row['error'])} | | |")
                continue
            peak = row.get("device_peak_allocated_bytes", row.get("host_peak_rss_bytes", 0)) / 2**30
            lines.append(f"| {row['method']} | {row['trainable_parameters']:,} | {_fmt(row['step_seconds_median'])} | "
                         f"{peak:.2f} |")

    serving = report["stages"]["serving"].get("result")
    if serving:
        lines += ["", f"## Generation throughput ({serving.get('preset')} preset, {serving.get('num_layers') or 'all'} "
                      f"LM layers, batch {serving.get('batch_size')}, {serving.get('new_tokens')} new tokens)", "",
                  f"Bare base: {_fmt(serving.get('base_tokens_per_s'))} tokens/s.", "",
                  "| system | distinct adapters | tokens/s | × base |", "|---|---:|---:|---:|"]
        base = serving.get("base_tokens_per_s") or float("nan")
        for system, by_n in serving.get("tokens_per_s", {}).items():
            # the benchmark's own ratio (median of per-round ratios, measured side by side) where it has one
            ratios = serving.get("ratios", {}).get(f"{system}_vs_base", {})
            lines += [f"| {system} | {n} | {_fmt(tps)} | {ratios.get(n, round(tps / base, 3))} |"
                      for n, tps in by_n.items()]
        for key, by_n in serving.get("ratios", {}).items():
            if not key.endswith("_vs_base"):
                lines.append(f"\n{key}: " + ", ".join(f"{_fmt(r)}× with {n} adapters" for n, r in by_n.items()))
        ablation = (serving.get("overhead_breakdown") or {}).get("ablation_ms")
        if ablation:
            lines += ["", "road_vlm's time above the base per `generate`, by switching its parts off (ms): "
                      + ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in ablation.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=int, required=True, help="the whole check's wall time")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    stages = read_stages(args.stages, dry_run=args.dry_run)
    env = stages["environment"].get("result") or {}
    gpu = env.get("gpu") or "cpu-dry-run"
    date = dt.date.today().isoformat()
    report = {"date": date, "gpu": gpu, "dry_run": args.dry_run, "seconds": args.seconds, "stages": stages}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{date}-{_slug(gpu)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(report))
    failed = [name for name, stage in stages.items() if not stage["ok"]]
    print(f"[gpu_check] report: {stem}.json, {stem}.md ({args.seconds} s)"
          + (f"; not ok: {', '.join(failed)}" if failed else "; every stage ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
