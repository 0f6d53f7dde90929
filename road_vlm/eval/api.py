"""``evaluate()``: the one entry point the CLI and the demo use to benchmark a model and its
checkpoints, sharded over processes and resumable."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from road_vlm.eval import predictions as preds_io
from road_vlm.eval.benchmarks import get_benchmark, parse_benchmarks
from road_vlm.eval.common import EvalDataError, EvalQuestion
from road_vlm.eval.report import write_results
from road_vlm.eval.runner import dist_info, run_benchmark
from road_vlm.eval.validate import check_annotations
from road_vlm.filenames import ADAPTER_CONFIG

logger = logging.getLogger(__name__)

BASE_ROW = "base"


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def resolve_checkpoints(adapters: Sequence[str | Path | None] | str | Path | None) -> list[tuple[str, Path | None]]:
    """(row name, adapter dir) per table row. ``None`` (alone or as a list item) -> the base model. A directory holding
    ``adapter_config.json`` is one checkpoint; a training output directory without one stands for
    all its ``checkpoint-*`` subdirectories that hold one (in step order)."""
    if adapters is None or (not isinstance(adapters, (str, Path)) and len(adapters) == 0):
        return [(BASE_ROW, None)]
    items = [adapters] if isinstance(adapters, (str, Path)) else list(adapters)
    found: list[Path | None] = []
    for item in items:
        if item is None:
            found.append(None)
            continue
        path = Path(item)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: adapter directory not found")
        if (path / ADAPTER_CONFIG).is_file():
            found.append(path)
            continue
        checkpoints = sorted((p for p in path.glob("checkpoint-*") if (p / ADAPTER_CONFIG).is_file()),
                             key=lambda p: (_checkpoint_step(p), p.name))
        if not checkpoints:
            raise FileNotFoundError(f"{path}: neither an adapter directory ({ADAPTER_CONFIG}) nor a training "
                                    "output directory with checkpoint-*/ adapter directories")
        found.extend(checkpoints)
    names = [BASE_ROW if p is None else p.name for p in found]
    rows: list[tuple[str, Path | None]] = []
    for path, name in zip(found, names):
        # Same leaf name from two runs (run1/checkpoint-50, run2/checkpoint-50): qualify with the parent.
        if path is not None and names.count(name) > 1:
            name = f"{path.parent.name}-{name}"
        rows.append((name, path))
    if len({r[0] for r in rows}) != len(rows):
        raise ValueError(f"adapter directories give ambiguous row names: {[r[0] for r in rows]}")
    return rows


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _maybe_init_distributed(world_size: int) -> bool:
    """Under torchrun / accelerate launch, join the process group (gloo: it only synchronises
    the merge, the model never communicates). Returns True when this call created it."""
    if world_size <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    if "MASTER_ADDR" not in os.environ:
        return False
    torch.distributed.init_process_group("gloo")
    return True


def load_questions(benchmarks: list[str], data_root: Path, image_dirs: dict[str, str] | None,
                   limit: int | None = None) -> dict[str, list[EvalQuestion]]:
    """Load and validate every benchmark (files, images, POPE label order) before any model work;
    with ``limit``, only the first questions of each."""
    out = {}
    for name in benchmarks:
        module = get_benchmark(name)
        questions = module.load(data_root, (image_dirs or {}).get(name))
        # Annotations too, so a bad data root fails before any generation, not after hours of it.
        check_annotations(name, data_root, questions)
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            questions = questions[:limit]
        out[name] = questions
    return out


def evaluate(
    model: str | Path,
    adapters: Sequence[str | Path] | str | Path | None = None,
    benchmarks: str | Sequence[str] = ("gqa", "scienceqa", "textvqa", "pope"),
    data_root: str | Path = "playground/data/eval",
    output: str | Path = "eval_results",
    batch_size: int = 8,
    *,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    image_dirs: dict[str, str] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    max_new_tokens: int | None = None,
    quantization: str | None = None,
) -> dict[str, Any]:
    """Generate and score ``benchmarks`` for the base model or each adapter checkpoint.

    ``quantization``: the base's (nf4/fp4/int8/none) for every row, the base row included; None = the one the
    checkpoints were trained on.

    ``adapters``: None (base model), adapter dirs, training output dirs (all their checkpoint-*),
    or a list mixing them with None (a "base" row). Predictions go to
    ``<output>/<row>/<benchmark>/predictions.jsonl`` (LLaVA's answers format, resumable); the table
    to ``<output>/results.{json,md}`` (+ ``results.png`` for several rows).

    Result: {"model", "data_root", "benchmarks", "limit", "max_new_tokens", "complete",
    "num_questions": {benchmark: n}, "checkpoints": {row: adapter dir | None},
    "rows": {row: {benchmark: score dict as printed by ``road-vlm score --json``}}}.
    With several processes (torchrun: RANK/WORLD_SIZE; or explicit ``rank``/``world_size``) each
    answers a contiguous chunk; after a barrier rank 0 merges the shards and scores. Without a
    process group (ranks run one after another) the call that finds every shard on disk merges
    and scores. Returns the results dict, or {} on a process that does not score.
    """
    explicit = rank is not None or world_size is not None
    env_rank, env_world = dist_info()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    created_group = False if explicit else _maybe_init_distributed(world_size)
    data_root, output = Path(data_root), Path(output)
    names = parse_benchmarks(benchmarks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    questions = load_questions(names, data_root, image_dirs)  # full lists: answers on disk are checked against them
    if max_new_tokens is not None:
        # Off-protocol (LLaVA uses 128, ScienceQA 1024): for smoke tests of untrained models
        # that never emit </s>. Recorded in results.json.
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        questions = {n: [dataclasses.replace(q, max_new_tokens=max_new_tokens) for q in qs]
                     for n, qs in questions.items()}
    work = {n: qs[:limit] for n, qs in questions.items()}
    rows = resolve_checkpoints(adapters)
    if quantization is None:
        from road_vlm.model import recorded_quantization

        quantization = recorded_quantization(*(a for _, a in rows if a is not None))
    if device.startswith("cuda") and world_size > 1 and ":" not in device:
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        for row_name, adapter in rows:
            loaded = None
            for name in names:
                out_dir = output / row_name / name
                if loaded is None and _needs_model(out_dir, questions[name], work[name], rank, world_size):
                    from road_vlm.model import load_vlm

                    loaded = load_vlm(model, adapter, device=device, dtype=dtype, quantization=quantization)
                run_benchmark(loaded, questions[name], out_dir, model_id=row_name, batch_size=batch_size,
                              rank=rank, world_size=world_size, progress=progress, desc=f"{row_name}/{name}",
                              limit=limit)
            del loaded
            gc.collect()
        _barrier(world_size)
        if grouped and rank != 0:
            return {}
        pending = [f"{r}/{n}" for r, _ in rows for n in names if not _all_answered(output / r / n, questions[n], work[n])]
        if pending:
            if world_size == 1 or grouped:
                raise RuntimeError(f"questions left unanswered after generation in {', '.join(pending)}")
            # Ranks run one after another without a process group: the last one scores.
            logger.info("rank %d of %d done; waiting for the other shards of %s", rank, world_size, pending[0])
            return {}
        results_rows: dict[str, dict[str, Any]] = {}
        for row_name, _ in rows:
            scores = {}
            for name in names:
                out_dir = output / row_name / name
                answered = preds_io.merge(out_dir, questions[name])
                rows_in_order = [answered[q.answer_key] for q in work[name]]
                source = str(out_dir / preds_io.PREDICTIONS)
                scores[name] = get_benchmark(name).score(rows_in_order, data_root, limit=limit, source=source)
            results_rows[row_name] = scores
    finally:
        if created_group:
            torch.distributed.destroy_process_group()
    results = {"model": str(model), "data_root": str(data_root), "benchmarks": names, "limit": limit,
               "max_new_tokens": max_new_tokens, "complete": limit is None and max_new_tokens is None,
               "num_questions": {n: len(work[n]) for n in names},
               "checkpoints": {r: (str(a) if a is not None else None) for r, a in rows},
               "rows": results_rows}
    write_results(output, results)
    return results


def _all_answered(out_dir: Path, questions: list[EvalQuestion], work: list[EvalQuestion]) -> bool:
    answered = preds_io.collect_answered(out_dir, questions)
    return all(q.answer_key in answered for q in work)


def _needs_model(out_dir: Path, questions: list[EvalQuestion], work: list[EvalQuestion], rank: int,
                 world_size: int) -> bool:
    from road_vlm.eval.runner import shard_bounds

    answered = preds_io.collect_answered(out_dir, questions)
    start, end = shard_bounds(len(work), rank, world_size)
    return any(q.answer_key not in answered for q in work[start:end])


__all__ = ["evaluate", "resolve_checkpoints", "load_questions", "EvalDataError"]
