"""``road-vlm demo``: the whole pipeline on an embedded default, on CPU, in about ten minutes.

1. synthetic data: shape/colour/sign images, instruction data and the four benchmarks in LLaVA's eval layout
2. a tiny LLaVA-1.5-architecture base (real ``LlavaForConditionalGeneration``, real tokenizer files) saved in
   HF format, then given basic abilities by a short full-parameter pretraining (captions + text-only
   instructions) — the stand-in for the CLIP + Vicuna + stage-1 checkpoint a real run starts from
3. RoAd4 (+ projector) training with ``deepspeed`` on 2 CPU processes, exactly the training recipe
4. eval of the base and the tuned model on the four synthetic benchmarks, before/after table
5. one chat answer about a demo image, through the same loader chat uses

Each stage is cached under the work directory, so a second run reuses what the first built.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from road_vlm.data.template import SYSTEM_V1

# The demo's tiny base: big enough for RoAd4 (+ projector) to learn the synthetic tasks in a few CPU minutes.
TINY_BASE = {"hidden_size": 128, "num_layers": 4, "vision_layers": 3, "image_size": 48}

# Benchmarks' headline metrics, in the order of the LLaVA-1.5 paper's table.
_HEADLINE = (("gqa", "accuracy", "GQA"), ("scienceqa", "img_accuracy", "SQA-IMG"),
             ("textvqa", "accuracy", "TextVQA"), ("pope", "f1_mean", "POPE"))


def default_workdir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "road_vlm" / "demo"


def _config_path() -> Path:
    """configs/demo.yaml of the source tree (the demo runs the real recipe with the real config)."""
    path = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the demo from a source checkout (pip install -e .)")
    return path


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(start: float, what: str) -> None:
    print(f"   {what} ({time.perf_counter() - start:.0f} s)", flush=True)


def prepare_data(workdir: Path, *, num_train: int, num_eval: int) -> tuple[Path, Path]:
    from road_vlm.data.synthetic import generate_eval_data, generate_training_data

    train_dir, eval_dir = workdir / "data" / "train", workdir / "data" / "eval"
    if not (train_dir / "instruct.json").is_file():
        generate_training_data(train_dir, seed=0, num_samples=num_train)
    if not (eval_dir / "pope" / "llava_pope_test.jsonl").is_file():
        generate_eval_data(eval_dir, seed=1, num_per_benchmark=num_eval)
    return train_dir, eval_dir


def prepare_base(workdir: Path, train_dir: Path, *, steps: int) -> Path:
    """The tiny base in HF format, built and pretrained once, then reused."""
    from road_vlm.data.synthetic import tokenizer_corpus
    from road_vlm.tiny import build_tiny_llava, pretrain_tiny_llava

    base = workdir / "base"
    if (base / "config.json").is_file() and (base / "model.safetensors").is_file():
        return base
    init = build_tiny_llava(workdir / "base-init", corpus=tokenizer_corpus() + [SYSTEM_V1], overwrite=True,
                            **TINY_BASE)
    pretrain_tiny_llava(init, train_dir / "pretrain_text.json", train_dir / "pretrain.json", base, steps=steps)
    return base


def train_adapter(workdir: Path, base: Path, train_dir: Path, *, num_processes: int, extra: list[str]) -> Path:
    from road_vlm.train.commands import launcher_command

    run_dir = workdir / "run"
    overrides = [
        f"model.name_or_path={base}",
        f"data.path={train_dir / 'instruct.json'}",
        f"output.dir={run_dir}",
        *extra,
    ]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    if num_processes > 1:
        cmd = launcher_command(str(_config_path()), overrides, num_processes=num_processes)
    else:
        cmd = [sys.executable, "-m", "road_vlm.train.entry", "--config", str(_config_path()), *overrides]
    print("   $ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise RuntimeError(f"training failed with exit code {code} (output so far is kept in {run_dir})")
    return run_dir


def _final_checkpoint(run_dir: Path) -> Path:
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [c for c in checkpoints if (c / "adapter_config.json").is_file()]
    if not complete:
        raise FileNotFoundError(f"{run_dir}: training wrote no checkpoint")
    return complete[-1]


def headline(results: dict[str, Any]) -> dict[str, float]:
    return {label: results[bench][metric] for bench, metric, label in _HEADLINE if bench in results}


def before_after_table(base: dict[str, float], tuned: dict[str, float]) -> str:
    lines = ["| benchmark | base (untuned) | RoAd4 tuned | change |", "|---|---:|---:|---:|"]
    for label in base:
        lines.append(f"| {label} | {base[label]:.1f} | {tuned[label]:.1f} | {tuned[label] - base[label]:+.1f} |")
    return "\n".join(lines)


def run_demo(
    workdir: Path, *, num_processes: int = 2, pretrain_steps: int = 1500, num_train: int = 4000,
    num_eval: int = 60, batch_size: int = 16, train_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run every stage (cached ones are reused) and return the before/after numbers."""
    from road_vlm.eval.api import evaluate

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    t = _stage(f"1/5 synthetic data -> {workdir / 'data'}")
    train_dir, eval_dir = prepare_data(workdir, num_train=num_train, num_eval=num_eval)
    _done(t, "training data and the four eval layouts ready")

    t = _stage(f"2/5 tiny LLaVA-1.5 base -> {workdir / 'base'}")
    base = prepare_base(workdir, train_dir, steps=pretrain_steps)
    _done(t, f"base ready: {base}")

    t = _stage(f"3/5 RoAd4 training, deepspeed on {num_processes} process(es) -> {workdir / 'run'}")
    run_dir = train_adapter(workdir, base, train_dir, num_processes=num_processes, extra=train_overrides or [])
    checkpoint = _final_checkpoint(run_dir)
    _done(t, f"adapter: {checkpoint}")

    t = _stage(f"4/5 eval of base and tuned model -> {workdir / 'eval'}")
    results = evaluate(model=base, adapters=[None, checkpoint], data_root=eval_dir, output=workdir / "eval",
                       batch_size=batch_size)
    rows = results["rows"]
    before, after = headline(rows["base"]), headline(rows[checkpoint.name])
    table = before_after_table(before, after)
    (workdir / "eval" / "before_after.md").write_text(table + "\n")
    print(table, flush=True)
    _done(t, "eval done")

    t = _stage("5/5 chat with the tuned model")
    answer = _chat_once(base, checkpoint, eval_dir)
    _done(t, "chat done")
    summary = {"workdir": str(workdir), "base": before, "tuned": after, "checkpoint": str(checkpoint),
               "chat": answer, "seconds": round(time.perf_counter() - t0, 1)}
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndemo finished in {summary['seconds']:.0f} s; everything is under {workdir}", flush=True)
    return summary


def _chat_once(base: Path, checkpoint: Path, eval_dir: Path) -> dict[str, str]:
    from road_vlm.model import load_vlm
    from road_vlm.serve.chat import ChatSession

    image = sorted((eval_dir / "gqa" / "data" / "images").glob("*.png"))[0]
    question = "What color is the shape? Answer the question using a single word or phrase."
    session = ChatSession(load_vlm(base, checkpoint), adapter=str(checkpoint))
    session.set_image(image)
    print(f"   image: {image}\n   USER: {question}\n   ASSISTANT: ", end="", flush=True)
    answer = session.ask(question, on_text=lambda piece: print(piece, end="", flush=True)).text
    print(flush=True)
    return {"image": str(image), "question": question, "answer": answer}


def _command(args: argparse.Namespace) -> int:
    run_demo(Path(args.workdir).expanduser(), num_processes=args.num_processes,
             pretrain_steps=args.pretrain_steps, train_overrides=args.overrides)
    return 0


def register(subparsers: Any) -> None:
    """Add ``demo`` to the ``road-vlm`` command."""
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on a tiny model and synthetic data (CPU, about ten minutes)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", default=str(default_workdir()),
                        help="where base/, data/, run/ and eval/ go (default: %(default)s)")
    parser.add_argument("--num-processes", type=int, default=2, help="deepspeed processes for training")
    parser.add_argument("--pretrain-steps", type=int, default=1500,
                        help="steps of each of the tiny base's two pretraining phases")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="training config overrides, e.g. train.max_steps=100")
    parser.set_defaults(func=_command)
