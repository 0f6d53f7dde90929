"""`road-vlm eval` and `road-vlm score` (registered by road_vlm/cli.py through ``register``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from road_vlm.eval.benchmarks import BENCHMARKS, HEADLINE, get_benchmark, parse_benchmarks
from road_vlm.eval.common import EvalDataError
from road_vlm.eval.predictions import read_predictions
from road_vlm.quantization import METHODS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` and ``score`` subcommands."""
    ev = subparsers.add_parser(
        "eval", help="generate answers and score GQA / ScienceQA-IMG / TextVQA / POPE",
        description="Evaluate a base model and/or adapter checkpoints with LLaVA-1.5's protocol. Resumable: "
                    "rerunning skips answered questions. Multi-process: launch with torchrun or accelerate.")
    ev.add_argument("--model", required=True, help="base LLaVA checkpoint (HF format dir or hub id)")
    ev.add_argument("--adapter", nargs="+", default=None, metavar="DIR",
                    help="adapter dir(s), or a training output dir (= all its checkpoint-*/); omit for the base model")
    ev.add_argument("--with-base", action="store_true",
                    help="also evaluate the base model without adapter (a 'base' row next to the checkpoints)")
    ev.add_argument("--benchmarks", default="gqa,scienceqa,textvqa,pope",
                    help="comma-separated subset of: " + ",".join(BENCHMARKS))
    ev.add_argument("--data-root", required=True, help="LLaVA's playground/data/eval layout (see eval/README.md)")
    ev.add_argument("--output", required=True, help="results folder")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--limit", type=int, default=None, help="only the first N questions per benchmark (smoke test)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, fp32 on CPU)")
    ev.add_argument("--quantization", choices=METHODS, default=None,
                    help="the base's language model in nf4/fp4/int8 (bitsandbytes) or none for every row "
                         "(default: what the checkpoints were trained on)")
    for name, module in BENCHMARKS.items():
        ev.add_argument(f"--{name}-images", default=None, metavar="DIR",
                        help=f"{name} image folder, relative to --data-root (default {module.DEFAULT_IMAGE_DIR})")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="override LLaVA's 128 (ScienceQA 1024) generated tokens; off-protocol, for smoke tests only")
    ev.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    ev.set_defaults(func=run_eval)

    sc = subparsers.add_parser(
        "score", help="score an existing answers file (LLaVA's format) without loading a model")
    sc.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    sc.add_argument("--data-root", required=True)
    sc.add_argument("--predictions", required=True, help="answers JSONL (question_id, prompt, text, ...)")
    sc.add_argument("--json", action="store_true", help="print one JSON object (percentages)")
    sc.set_defaults(func=run_score)


def run_eval(args: argparse.Namespace) -> int:
    from road_vlm.eval.api import evaluate

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    image_dirs = {name: getattr(args, f"{name}_images") for name in BENCHMARKS if getattr(args, f"{name}_images")}
    adapters = ([None] if args.with_base else []) + list(args.adapter or [])
    try:
        results = evaluate(args.model, adapters or None, parse_benchmarks(args.benchmarks), args.data_root, args.output,
                           batch_size=args.batch_size, limit=args.limit, device=args.device, dtype=args.dtype,
                           image_dirs=image_dirs, progress=not args.no_progress,
                           max_new_tokens=args.max_new_tokens, quantization=args.quantization)
    except (EvalDataError, FileNotFoundError, ValueError) as err:
        print(f"road-vlm eval: error: {err}", file=sys.stderr)
        return 2
    if results:
        print((Path(args.output) / "results.md").read_text(encoding="utf-8"))
    return 0


def run_score(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    module = get_benchmark(args.benchmark)
    path = Path(args.predictions)
    try:
        if not path.is_file():
            raise EvalDataError(f"{path}: predictions file not found")
        rows = read_predictions(path)
        if not rows:
            raise EvalDataError(f"{path}: the predictions file is empty")
        scores = module.score(rows, args.data_root, source=str(path))
    except (EvalDataError, ValueError) as err:
        print(f"road-vlm score: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(scores))
    else:
        label, key = HEADLINE[args.benchmark]
        print(f"{label}: {scores[key]:.2f}  (from {len(rows)} answers in {path})")
        print(json.dumps(scores, indent=2))
    return 0
