#!/usr/bin/env python
"""Composability, measured: two RoAd4 adapters on disjoint halves of the pairs, composed without retraining,
against two LoRA adapters merged by PEFT's ``add_weighted_adapter`` (the field's usual alternative).

On the demo's tiny base (``road_vlm.demo.pipeline``; a finished ``make demo`` is reused) and its synthetic data:

1. split the instruction data into two tasks: *shapes* (colour/shape/count questions and "Is there a ...?" about
   shape images) and *text* (reading the word on a sign);
2. train with the real recipe (``configs/demo.yaml``, deepspeed): RoAd4 on shapes with ``adapter.pair_subset=1/2``,
   RoAd4 on text with ``2/2``, and LoRA on each task (same steps, no projector training anywhere);
3. ``road-vlm compose`` the two RoAd adapters; sum the two LoRA adapters with PEFT (``combination_type="cat"``:
   exactly dW_A + dW_B);
4. evaluate base, each single adapter and both combinations on GQA (shapes) and TextVQA (text).

``--recipe anchored`` trains each adapter on its task plus the other task's prompts answered by the *base* model
(greedy, first turn; as many as half the task's samples): it learns its task and to leave the other task's
inputs as the base had them, which is what composing on disjoint pairs relies on. Both methods get the same data.

Printed as JSON (and a markdown table): each score, each adapter's gain over the base on its own task, and the
share of that gain the combination keeps ("retained"). Target: the composed RoAd adapter keeps >= 90% on both.

    python scripts/bench_compose.py                      # reuses the demo's base
    python scripts/bench_compose.py --quick              # pipeline smoke test on a random tiny base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO

TASKS = {"shapes": "gqa", "text": "textvqa"}  # task -> the benchmark that measures it
SUBSETS = {"shapes": "1/2", "text": "2/2"}


def split_tasks(train_dir: Path, out_dir: Path) -> dict[str, Path]:
    """instruct.json -> one file per task (records keep their image paths, relative to ``train_dir``)."""
    from road_vlm.demo.synthetic import load_specs

    specs = load_specs(train_dir)
    records = json.loads((train_dir / "instruct.json").read_text())
    tasks: dict[str, list] = {"shapes": [], "text": []}
    for record in records:
        spec = specs.get(record.get("image", ""))
        if spec is None:
            continue  # text-only chats and text-only ScienceQA belong to neither task
        first = record["conversations"][0]["value"]
        if spec.word is not None:
            tasks["text"].append(record)
        elif "Options:" not in first:  # ScienceQA-style multiple choice is a third skill: left out
            tasks["shapes"].append(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task, rows in tasks.items():
        paths[task] = out_dir / f"{task}.json"
        paths[task].write_text(json.dumps(rows))
    return paths


def anchor_records(base: Path, task_file: Path, image_folder: Path, count: int, out: Path) -> Path:
    """``count`` records of ``task_file``, first turn only, answered by the base model (greedy): data that teaches
    an adapter to leave those inputs as the base had them."""
    from road_vlm.data.images import load_image
    from road_vlm.generation import GenerationRequest, SamplingParams, generate_batch, prepare_prompt
    from road_vlm.model import load_vlm

    if out.is_file():
        return out
    records = json.loads(task_file.read_text())[:count]
    model, processor, fmt = load_vlm(base)
    anchored = []
    for start in range(0, len(records), 32):
        chunk = records[start:start + 32]
        requests = []
        for record in chunk:
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            image = load_image(image_folder / record["image"]) if "image" in record else None
            prompt = prepare_prompt(model, processor, fmt, [], question, image)
            requests.append(GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=16)))
        for record, result in zip(chunk, generate_batch(model, processor.tokenizer, requests)):
            answer = result.text.strip() or "."
            anchored.append({**record, "id": f"anchor-{record['id']}",
                             "conversations": [record["conversations"][0], {"from": "gpt", "value": answer}]})
    out.write_text(json.dumps(anchored))
    return out


def train(base: Path, data: Path, image_folder: Path, out: Path, *, variant: str, subset: str | None, steps: int,
          num_processes: int, learning_rate: float) -> Path:
    """One run of the real recipe; returns its final checkpoint (an existing one is reused)."""
    from road_vlm.demo.pipeline import _config_path
    from road_vlm.train.commands import launcher_command

    if (out / "summary.json").is_file():
        return _final_checkpoint(out)
    overrides = [f"model.name_or_path={base}", f"data.path={data}", f"data.image_folder={image_folder}",
                 f"output.dir={out}", f"adapter.variant={variant}", "adapter.train_projector=false",
                 f"adapter.pair_subset={subset if subset else 'null'}", f"train.max_steps={steps}",
                 f"train.save_steps={steps}", f"train.learning_rate={learning_rate}", "output.report_to=none"]
    if num_processes > 1:
        cmd = launcher_command(str(_config_path()), overrides, num_processes=num_processes)
    else:
        cmd = [sys.executable, "-m", "road_vlm.train.entry", "--config", str(_config_path()), *overrides]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"   training {out.name} ({variant}, pairs {subset or 'all'}, {steps} steps; log: {log})", file=sys.stderr,
          flush=True)
    with open(log, "w") as handle:
        code = subprocess.call(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        raise RuntimeError(f"training {out.name} failed (exit {code}); see {log}")
    return _final_checkpoint(out)


def _final_checkpoint(run: Path) -> Path:
    """The final checkpoint a finished training run names in its summary.json."""
    return Path(json.loads((run / "summary.json").read_text())["final_checkpoint"])


def lora_sum(base: Path, adapters: list[Path], out: Path) -> Path:
    """PEFT's add_weighted_adapter(combination_type="cat", weights 1, 1): dW = dW_A + dW_B exactly, written back
    as a road_vlm LoRA directory (rank r_A + r_B, scale 1) so that the same eval pipeline loads it."""
    from peft import PeftModel

    from road_vlm.adapters import read_adapter_config
    from road_vlm.model import load_base
    from road_vlm.serve.export import export_peft

    if (out / "adapter_model.safetensors").is_file():
        return out
    peft_dirs = [export_peft(a, out.parent / f"{out.name}-peft-{i}", overwrite=True) for i, a in enumerate(adapters)]
    model, _ = load_base(base)
    peft = PeftModel.from_pretrained(model, str(peft_dirs[0]), adapter_name="a0")
    for i, d in enumerate(peft_dirs[1:], start=1):
        peft.load_adapter(str(d), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(peft_dirs))]
    peft.add_weighted_adapter(names, [1.0] * len(names), "sum", combination_type="cat")
    saved = out.parent / f"{out.name}-peft-sum"
    peft.save_pretrained(str(saved), selected_adapters=["sum"])
    rank = json.loads((saved / "sum" / "adapter_config.json").read_text())["r"]
    config = read_adapter_config(adapters[0])
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(saved / "sum" / "adapter_model.safetensors", out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "format": "road_vlm", "format_version": 1, **config.to_dict(), "lora_r": rank, "lora_alpha": float(rank),
        "lora_dropout": 0.0}, indent=2))
    for d in [*peft_dirs, saved]:
        shutil.rmtree(d)
    return out


def report(rows: dict, seconds: float, setup: dict) -> dict:
    def score(row: str, task: str) -> float:
        return float(rows[row][TASKS[task]]["accuracy"])

    def gain(row: str, task: str) -> float:
        return score(row, task) - score("base", task)

    table = {row: {task: round(score(row, task), 2) for task in TASKS} for row in rows}
    singles = {"road4": {"shapes": "road4_shapes", "text": "road4_text"},
               "lora": {"shapes": "lora_shapes", "text": "lora_text"}}
    combined = {"road4": "road4_composed", "lora": "lora_summed"}
    retained = {}
    for method, single in singles.items():
        retained[method] = {}
        for task, row in single.items():
            own = gain(row, task)
            retained[method][task] = (round(100.0 * gain(combined[method], task) / own, 1) if own > 0 else None)
    return {"setup": setup, "accuracy": table, "gain_over_base": {
        row: {task: round(gain(row, task), 2) for task in TASKS} for row in rows},
        "retained_percent": retained, "seconds": round(seconds, 1)}


def markdown(result: dict) -> str:
    lines = ["| model | GQA (shapes) | TextVQA (text) |", "|---|---:|---:|"]
    for row, scores in result["accuracy"].items():
        lines.append(f"| {row} | {scores['shapes']:.1f} | {scores['text']:.1f} |")
    lines.append("")
    lines.append("| combination | keeps of the shapes adapter's GQA gain | keeps of the text adapter's TextVQA gain |")
    lines.append("|---|---:|---:|")
    names = {"road4": "RoAd4 composed (road-vlm compose)", "lora": "LoRA summed (PEFT add_weighted_adapter)"}
    for method, kept in result["retained_percent"].items():
        cells = [f"{kept[t]:.0f}%" if kept[t] is not None else "n/a (no gain)" for t in TASKS]
        lines.append(f"| {names[method]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> int:
    from road_vlm.demo import pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=pipeline.default_workdir(),
                        help="the demo's work directory (its base and data are reused or built); results go to "
                        "WORKDIR/compose")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per adapter")
    parser.add_argument("--num-eval", type=int, default=200, help="questions per benchmark in the bench's eval set")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--road-lr", type=float, default=3e-2, help="RoAd learning rate (the demo's)")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA learning rate")
    parser.add_argument("--recipe", choices=("independent", "anchored"), default="independent",
                        help="independent: each adapter sees only its task; anchored: plus the other task's prompts "
                        "with the base model's answers")
    parser.add_argument("--quick", action="store_true", help="random tiny base, a few steps: pipeline check only")
    args = parser.parse_args()

    from road_vlm.adapters.compose import compose_dirs
    from road_vlm.demo.synthetic import generate_eval_data, generate_training_data, tokenizer_corpus
    from road_vlm.eval.api import evaluate

    start = time.perf_counter()
    if args.quick:
        work = args.workdir / f"compose-quick-{args.recipe}"
        train_dir = generate_training_data(work / "data" / "train", num_samples=60)
        from road_vlm.demo.tiny_base import build_tiny_llava

        base = work / "base"
        if not (base / "config.json").is_file():
            build_tiny_llava(base, corpus=tokenizer_corpus(), overwrite=True)
        steps, num_eval, processes = 2, 4, 1
    else:
        print(f"== demo base and data in {args.workdir}", file=sys.stderr, flush=True)
        pipeline.run_demo(args.workdir, until="base")  # reused when a demo already built them
        work = pipeline.Workdir(args.workdir)
        train_dir, base = work.train_data, work.base
        work = args.workdir / ("compose" if args.recipe == "independent" else f"compose-{args.recipe}")
        steps, num_eval, processes = args.steps, args.num_eval, args.num_processes
    eval_dir = work / f"eval-data-{num_eval}"
    if not (eval_dir / "pope" / "llava_pope_test.jsonl").is_file():
        generate_eval_data(eval_dir, seed=7, num_per_benchmark=num_eval)
    task_files = split_tasks(train_dir, work / "tasks")
    if args.recipe == "anchored":
        sizes = {t: len(json.loads(p.read_text())) for t, p in task_files.items()}
        anchors = {t: anchor_records(base, task_files[o], train_dir, sizes[t] // 2, work / "tasks" / f"anchor-{o}.json")
                   for t, o in (("shapes", "text"), ("text", "shapes"))}
        for task in TASKS:
            mixed = json.loads(task_files[task].read_text()) + json.loads(anchors[task].read_text())
            task_files[task] = work / "tasks" / f"{task}-anchored.json"
            task_files[task].write_text(json.dumps(mixed))

    adapters = {}
    for task in TASKS:
        adapters[f"road4_{task}"] = train(base, task_files[task], train_dir, work / "runs" / f"road4_{task}",
                                          variant="road4", subset=SUBSETS[task], steps=steps,
                                          num_processes=processes, learning_rate=args.road_lr)
        adapters[f"lora_{task}"] = train(base, task_files[task], train_dir, work / "runs" / f"lora_{task}",
                                         variant="lora", subset=None, steps=steps, num_processes=processes,
                                         learning_rate=args.lora_lr)
    rows_dir = work / "adapters"
    rows_dir.mkdir(parents=True, exist_ok=True)
    for name, checkpoint in adapters.items():  # eval rows are named after their directory
        if not (rows_dir / name).is_dir():
            shutil.copytree(checkpoint, rows_dir / name)
    composed = rows_dir / "road4_composed"
    if not composed.is_dir():
        compose_dirs([rows_dir / "road4_shapes", rows_dir / "road4_text"], composed)
    lora_sum(base, [rows_dir / "lora_shapes", rows_dir / "lora_text"], rows_dir / "lora_summed")

    order = ["road4_shapes", "road4_text", "road4_composed", "lora_shapes", "lora_text", "lora_summed"]
    print("== eval", file=sys.stderr, flush=True)
    results = evaluate(model=base, adapters=[None, *(rows_dir / n for n in order)], benchmarks=list(TASKS.values()),
                       data_root=eval_dir, output=work / "eval", batch_size=16, progress=False,
                       max_new_tokens=8 if args.quick else None)
    setup = {"base": str(base), "steps_per_adapter": steps, "processes": processes,
             "questions_per_benchmark": results["num_questions"], "road_lr": args.road_lr, "lora_lr": args.lora_lr,
             "train_samples": {t: len(json.loads(p.read_text())) for t, p in task_files.items()},
             "recipe": args.recipe, "quick": args.quick}
    result = report(results["rows"], time.perf_counter() - start, setup)
    (work / "bench_compose.md").write_text(markdown(result) + "\n")
    print(markdown(result), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
