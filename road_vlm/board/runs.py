"""Find training runs and eval results under a folder, from the files the trainer and ``road-vlm eval`` write.

A run is a folder with the trainer's ``summary.json`` (its loss and learning-rate history comes from the newest
checkpoint's ``trainer_state.json``); an eval result is a folder with ``results.json``. An eval belongs to a run
when the checkpoints it scored lie inside the run's folder. Files that are not road_vlm's are skipped with a
reason shown on the board, never guessed at.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from road_vlm.filenames import TRAINER_STATE

MAX_FILES = 2000  # summary.json + results.json files read per scan: a board over a huge tree stays responsive
_SKIP_DIRS = {".git", ".data-cache", "__pycache__", "node_modules"}


@dataclass
class EvalResult:
    path: Path  # the folder holding results.json
    results: dict[str, Any]

    def steps(self) -> dict[str, int | None]:
        """Row name -> training step (``checkpoint-N``), None for the base row or other names."""
        out: dict[str, int | None] = {}
        for row in self.results["rows"]:
            match = re.fullmatch(r"checkpoint-(\d+)", row)
            out[row] = int(match.group(1)) if match else None
        return out


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "lr"} per optimizer step
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config.yaml of the newest checkpoint
    evals: list[EvalResult] = field(default_factory=list)


@dataclass
class Board:
    runs: list[Run]
    evals: list[EvalResult]  # those that belong to no run
    problems: list[str]  # files that could not be read, with the reason


def _checkpoint_dirs(run: Path) -> list[Path]:
    found = [(int(p.name.split("-")[-1]), p) for p in run.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return [p for _, p in sorted(found)]


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problems.append(f"{path}: {err}")
        return None


def _read_run(folder: Path, summary: dict[str, Any], problems: list[str]) -> Run:
    import yaml

    run = Run(path=folder, summary=summary)
    checkpoints = _checkpoint_dirs(folder)
    if checkpoints:
        state = _read_json(checkpoints[-1] / TRAINER_STATE, problems)
        if isinstance(state, dict):
            run.history = [h for h in state.get("loss_history", []) if isinstance(h, dict)]
        config_file = checkpoints[-1] / "config.yaml"
        if config_file.is_file():
            try:
                run.config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as err:
                problems.append(f"{config_file}: {err}")
    return run


def scan(roots: list[Path]) -> Board:
    """Every run and eval result under ``roots`` (read fresh on each call: new runs appear as they finish)."""
    runs: list[Run] = []
    evals: list[EvalResult] = []
    problems: list[str] = []
    seen = 0
    for root in roots:
        if not root.is_dir():
            problems.append(f"{root}: not a folder")
            continue
        for path in sorted(_walk(root)):
            seen += 1
            if seen > MAX_FILES:
                problems.append(f"more than {MAX_FILES} summary/results files under {', '.join(map(str, roots))}: "
                                "the rest is not shown (point --runs at a smaller folder)")
                break
            data = _read_json(path, problems)
            if path.name == "summary.json" and isinstance(data, dict) and "global_step" in data:
                runs.append(_read_run(path.parent, data, problems))
            elif path.name == "results.json" and isinstance(data, dict) and isinstance(data.get("rows"), dict):
                evals.append(EvalResult(path.parent, data))
            elif data is not None:
                problems.append(f"{path}: not a road_vlm {path.stem} file")
    unattached = []
    for result in evals:
        owners = {run.path for run in runs for adapter in result.results.get("checkpoints", {}).values()
                  if adapter and _inside(Path(adapter), run.path)}
        matched = [run for run in runs if run.path in owners]
        for run in matched:
            run.evals.append(result)
        if not matched:
            unattached.append(result)
    return Board(runs=runs, evals=unattached, problems=problems)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _walk(root: Path):
    """summary.json and results.json files under ``root``, not descending into checkpoints' internals."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                if entry.name not in _SKIP_DIRS and not entry.name.startswith("global_step"):
                    stack.append(entry)
            elif entry.name in ("summary.json", "results.json"):
                yield entry
