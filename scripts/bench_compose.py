#!/usr/bin/env python
"""Composability, measured with intervals: RoAd4 adapters on disjoint halves of the pairs, trained by several
recipes and composed, against two LoRA adapters merged by PEFT's ``add_weighted_adapter`` (sum and TIES).

On the demo's tiny base (``road_vlm.demo.pipeline``; a finished ``make demo`` is reused) and its synthetic data,
two tasks: *shapes* (colour/shape/count questions and "Is there a ...?" about shape images, measured by GQA) and
*text* (reading the word on a sign, measured by TextVQA); the shapes adapter gets pairs 1/2, the text one 2/2.
Every run is the real recipe (``configs/demo.yaml`` written out per run with its changes; no projector training):

- ``independent``: each adapter trained alone on its task, then ``road-vlm compose``;
- ``anchored``: each adapter also sees the other task's prompts answered by the base model (greedy), so it learns
  to leave those inputs as the base had them;
- ``cotrained``: one run, ``compose.tasks`` = both tasks; on a task's batch the partner adapter is on half of the
  time, with no gradient (twice the steps of a single adapter, the smaller task's records repeated to the larger's
  size: each adapter sees about as many batches as alone);
- ``cotrained_anchored``: co-trained on the anchored task files;
- ``sequential``: the text adapter trained with the independent shapes adapter frozen and composed in;
- ``feature_anchored``: co-trained plus an MSE (weight 1) keeping each adapter's hidden states (middle and last
  decoder layer) near the base's on the other task's prompts; ``feature_anchored_1.5x``: the same with 1.5 times
  the steps per adapter (the anchor costs each adapter part of its own gain; more steps win it back);
- baselines ``lora``: a LoRA adapter per task (independent) summed by PEFT (``combination_type="cat"``: exactly
  dW_A + dW_B) and merged by TIES.

Every row is evaluated on the same questions; each question's score is read back from the predictions, and a
paired bootstrap (the same resampled questions for every row and seed) gives a 95 % interval for every figure:
the composed model's retention of each gain, ``(composed - base) / (single - base)``, where ``single`` is the
*independent* recipe's adapter of the same seed (LoRA's for the LoRA merges), so shrinking the gains cannot pass;
and for each recipe's single adapters, the share of the independent gain they keep and their drift on the other
task. Output: JSON on stdout and markdown tables in WORKDIR/compose/bench_compose.md. Finished runs (summary.json)
and answered questions are reused, so an interrupted bench resumes.

    python scripts/bench_compose.py                            # every recipe, seeds 0 and 1, 1000 questions
    python scripts/bench_compose.py --recipes independent cotrained --seeds 0
    python scripts/bench_compose.py --quick                    # pipeline smoke test on a random tiny base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from _common import REPO
from _compose_stats import OTHER, TASKS, Bootstrap, done_when, figures, markdown, question_scores
from road_vlm.filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HF_CONFIG

SUBSETS = {"shapes": "1/2", "text": "2/2"}


@dataclass(frozen=True)
class Recipe:
    data: str  # "plain" or "anchored": which task files the adapters train on
    kind: str  # "separate" (one run per task, then compose), "cotrained" (one run) or "sequential"
    feature_anchor_weight: float = 0.0
    steps_factor: float = 1.0  # co-trained: steps per adapter as a multiple of --steps


RECIPES = {
    "independent": Recipe("plain", "separate"),
    "anchored": Recipe("anchored", "separate"),
    "cotrained": Recipe("plain", "cotrained"),
    "cotrained_anchored": Recipe("anchored", "cotrained"),
    "sequential": Recipe("plain", "sequential"),
    "feature_anchored": Recipe("plain", "cotrained", feature_anchor_weight=1.0),
    "feature_anchored_1.5x": Recipe("plain", "cotrained", feature_anchor_weight=1.0, steps_factor=1.5),
}
LORA = "lora"  # the baselines' name in --recipes
LORA_MERGES = {"lora_cat": "cat", "lora_ties": "ties"}  # row -> add_weighted_adapter's combination_type
QUICK_RECIPES = ("independent", "cotrained", "sequential", LORA)
LEFT_OUT = {"lora_cotrained": "LoRA cannot be co-trained on disjoint pairs: a LoRA update B A is dense across "
            "output dimensions, so the two adapters would write the same outputs, and compose (like compose.tasks) "
            "refuses LoRA"}
NOTES = {"lora_ties": "PEFT's add_weighted_adapter(combination_type='ties', density 0.5, weights 1, 1) applies TIES "
         "to the A factors and to the B factors separately and saves rank r (not r_A + r_B), with scale 1"}


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


def anchored_task_files(base: Path, train_dir: Path, plain: dict[str, Path]) -> dict[str, Path]:
    """Each task's records plus as many as half as many of the other task's prompts with the base's answers."""
    out = {}
    for task, other in OTHER.items():
        count = len(json.loads(plain[task].read_text())) // 2
        anchors = anchor_records(base, plain[other], train_dir, count, plain[task].parent / f"anchor-{other}.json")
        out[task] = plain[task].parent / f"{task}-anchored.json"
        out[task].write_text(json.dumps(json.loads(plain[task].read_text()) + json.loads(anchors.read_text())))
    return out


@dataclass
class Bench:
    """What every run shares: the base, the data, the work directory and the training budget."""

    base: Path
    train_dir: Path  # the training images' folder
    work: Path
    task_files: dict[str, dict[str, Path]]  # "plain" / "anchored" -> task -> file
    steps: int
    processes: int
    road_lr: float
    lora_lr: float

    def train(self, out: Path, *, seed: int, variant: str, steps: int | None = None, data: Path | None = None,
              subset: str | None = None, compose: dict | None = None) -> Path:
        """One run of configs/demo.yaml with this run's changes, written to ``<out>.yaml``; returns its final
        checkpoint (a finished run is reused)."""
        if (out / "summary.json").is_file():
            return _final_checkpoint(out)
        from road_vlm.demo.pipeline import _config_path

        steps = steps or self.steps
        config = yaml.safe_load(_config_path().read_text())
        config["model"]["name_or_path"] = str(self.base)
        config["adapter"].update(variant=variant, train_projector=False, pair_subset=subset)
        config["data"]["image_folder"] = str(self.train_dir)
        if data is None:
            del config["data"]["path"]  # co-training reads each task's data
        else:
            config["data"]["path"] = str(data)
        lr = self.lora_lr if variant == "lora" else self.road_lr
        config["train"].update(seed=seed, max_steps=steps, save_steps=steps, learning_rate=lr)
        config["deepspeed"]["config"] = str(REPO / config["deepspeed"]["config"])
        config["output"].update(dir=str(out), report_to="none")
        if compose is not None:
            config["compose"] = compose
            if "tasks" in compose:
                config["data"]["group_by_modality_length"] = False  # co-training batches one task at a time
        out.parent.mkdir(parents=True, exist_ok=True)
        config_file = out.parent / f"{out.name}.yaml"  # not with_suffix: recipe names may hold a dot
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        _launch(config_file, out, self.processes)
        return _final_checkpoint(out)


def _launch(config_file: Path, out: Path, processes: int) -> None:
    from road_vlm.train.commands import launcher_command

    if processes > 1:
        cmd = launcher_command(str(config_file), [], num_processes=processes)
    else:
        cmd = [sys.executable, "-m", "road_vlm.train.entry", "--config", str(config_file)]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    log = out.parent / f"{out.name}.log"
    print(f"   training {out.parent.parent.name}/{out.name} (config {config_file.name}; log {log})", file=sys.stderr,
          flush=True)
    with open(log, "w") as handle:
        code = subprocess.call(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        raise RuntimeError(f"training {out.name} failed (exit {code}); see {log}")


def _final_checkpoint(run: Path) -> Path:
    """The final checkpoint a finished training run names in its summary.json."""
    return Path(json.loads((run / "summary.json").read_text())["final_checkpoint"])


def recipe_adapters(bench: Bench, name: str, seed: int) -> dict[str, Path]:
    """A recipe's adapters for one seed: {"shapes": dir, "text": dir, "composed": dir}."""
    from road_vlm.adapters.compose import compose_dirs

    recipe = RECIPES[name]
    files = bench.task_files[recipe.data]
    runs = bench.work / f"seed{seed}" / "runs"
    if recipe.kind == "separate":
        singles = {task: bench.train(runs / f"{name}_{task}", seed=seed, variant="road4", data=files[task],
                                     subset=SUBSETS[task]) for task in TASKS}
        composed = bench.work / f"seed{seed}" / "composed" / name
        if not (composed / ADAPTER_CONFIG).is_file():
            compose_dirs([singles["shapes"], singles["text"]], composed)
        return {**singles, "composed": composed}
    if recipe.kind == "cotrained":
        files = balanced(files)
        compose = {"tasks": [{"name": t, "data": str(files[t]), "pair_subset": SUBSETS[t]} for t in TASKS],
                   "partner_prob": 0.5, "feature_anchor_weight": recipe.feature_anchor_weight}
        if recipe.feature_anchor_weight:
            layers = json.loads((bench.base / HF_CONFIG).read_text())["text_config"]["num_hidden_layers"]
            compose["feature_anchor_layers"] = [layers // 2, layers]  # the middle and the last decoder layer
        steps = round(bench.steps * len(TASKS) * recipe.steps_factor)
        checkpoint = bench.train(runs / name, seed=seed, variant="road4", steps=steps, compose=compose)
        return {**{task: checkpoint / "parts" / task for task in TASKS}, "composed": checkpoint}
    prior = recipe_adapters(bench, "independent", seed)["shapes"]  # reused: the independent recipe ran first
    checkpoint = bench.train(runs / name, seed=seed, variant="road4", data=files["text"], subset=SUBSETS["text"],
                             compose={"compose_with": str(prior)})
    return {"shapes": checkpoint / "parts" / "prior", "text": checkpoint / "parts" / "new", "composed": checkpoint}


def balanced(files: dict[str, Path]) -> dict[str, Path]:
    """Co-training gives each task steps in proportion to its samples; the smaller task's records are repeated
    (ids made unique) to about the larger one's size, so each adapter sees about as many batches as alone."""
    rows = {task: json.loads(path.read_text()) for task, path in files.items()}
    largest = max(len(r) for r in rows.values())
    out = {}
    for task, records in rows.items():
        times = max(1, round(largest / len(records)))
        out[task] = files[task] if times == 1 else files[task].with_name(f"{files[task].stem}-x{times}.json")
        if times > 1 and not out[task].is_file():
            out[task].write_text(json.dumps([{**r, "id": f"{r['id']}-r{k}"} for k in range(times) for r in records]))
    return out


def lora_adapters(bench: Bench, seed: int) -> dict[str, Path]:
    """One LoRA adapter per task (independent data) and their PEFT merges: {"shapes", "text", "cat", "ties"}."""
    runs = bench.work / f"seed{seed}" / "runs"
    singles = {task: bench.train(runs / f"lora_{task}", seed=seed, variant="lora",
                                 data=bench.task_files["plain"][task]) for task in TASKS}
    merged = {row.removeprefix("lora_"): lora_merge(bench.base, [singles["shapes"], singles["text"]],
                                                    bench.work / f"seed{seed}" / "composed" / row, combination)
              for row, combination in LORA_MERGES.items()}
    return {**singles, **merged}


def lora_merge(base: Path, adapters: list[Path], out: Path, combination: str) -> Path:
    """PEFT's add_weighted_adapter (weights 1, 1; TIES with density 0.5), written back as a road_vlm LoRA
    directory with the rank and alpha PEFT saved, so that the same eval pipeline loads it."""
    from peft import PeftModel

    from road_vlm.adapters import read_adapter_config
    from road_vlm.model import load_base
    from road_vlm.serve.export import export_peft

    if (out / ADAPTER_WEIGHTS).is_file():
        return out
    peft_dirs = [export_peft(a, out.parent / f"{out.name}-peft-{i}", overwrite=True) for i, a in enumerate(adapters)]
    model, _ = load_base(base)
    peft = PeftModel.from_pretrained(model, str(peft_dirs[0]), adapter_name="a0")
    for i, directory in enumerate(peft_dirs[1:], start=1):
        peft.load_adapter(str(directory), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(peft_dirs))]
    density = {"density": 0.5} if combination == "ties" else {}
    peft.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=combination, **density)
    saved = out.parent / f"{out.name}-peft-merged"
    peft.save_pretrained(str(saved), selected_adapters=["merged"])
    peft_config = json.loads((saved / "merged" / ADAPTER_CONFIG).read_text())
    config = read_adapter_config(adapters[0])
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(saved / "merged" / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps({
        "format": "road_vlm", "format_version": 1, **config.to_dict(), "lora_r": peft_config["r"],
        "lora_alpha": float(peft_config["lora_alpha"]), "lora_dropout": 0.0}, indent=2))
    for directory in [*peft_dirs, saved]:
        shutil.rmtree(directory)
    return out


def methods(recipes: list[str]) -> dict[str, dict[str, dict[str, str] | str]]:
    """Each composed model to judge: its row, its single adapters' rows and the rows whose gains it must keep."""
    out: dict[str, dict] = {}
    for name in recipes:
        if name == LORA:
            for row in LORA_MERGES:
                out[row] = {"composed": row, "singles": {t: f"lora_{t}" for t in TASKS},
                            "reference": {t: f"lora_{t}" for t in TASKS}}
        else:
            out[name] = {"composed": f"{name}_composed", "singles": {t: f"{name}_{t}" for t in TASKS},
                         "reference": {t: f"independent_{t}" for t in TASKS}}
    return out


def prepare(args: argparse.Namespace, recipes: list[str]) -> tuple[Bench, Path]:
    """The base, the task files and the eval set: the demo's (built or reused), or a random tiny base (--quick)."""
    from road_vlm.demo import pipeline
    from road_vlm.demo.synthetic import generate_eval_data, generate_training_data, tokenizer_corpus

    if args.quick:
        from road_vlm.demo.tiny_base import build_tiny_llava

        work = args.workdir / "compose-quick"
        train_dir = generate_training_data(work / "data" / "train", num_samples=60)
        base = work / "base"
        if not (base / "config.json").is_file():
            build_tiny_llava(base, corpus=tokenizer_corpus(), overwrite=True)
    else:
        print(f"== demo base and data in {args.workdir}", file=sys.stderr, flush=True)
        pipeline.run_demo(args.workdir, until="base")  # reused when a demo already built them
        demo = pipeline.Workdir(args.workdir)
        work, train_dir, base = args.workdir / "compose", demo.train_data, demo.base
    eval_dir = work / f"eval-data-{args.num_eval}"
    if not (eval_dir / "pope" / "llava_pope_test.jsonl").is_file():
        generate_eval_data(eval_dir, seed=7, num_per_benchmark=args.num_eval)
    plain = split_tasks(train_dir, work / "tasks")
    files = {"plain": plain}
    if any(name != LORA and RECIPES[name].data == "anchored" for name in recipes):
        files["anchored"] = anchored_task_files(base, train_dir, plain)
    bench = Bench(base, train_dir, work, files, args.steps, args.num_processes, args.road_lr, args.lora_lr)
    return bench, eval_dir


def seed_rows(bench: Bench, recipes: list[str], seed: int) -> dict[str, Path]:
    """Train (or reuse) every recipe for one seed; eval rows named ``s<seed>-<recipe>_<part>``, copied into
    WORK/adapters (``evaluate`` names a row after its directory)."""
    found: dict[str, Path] = {}
    for name in recipes:
        parts = lora_adapters(bench, seed) if name == LORA else recipe_adapters(bench, name, seed)
        found.update({f"{LORA if name == LORA else name}_{part}": path for part, path in parts.items()})
    rows = {}
    for row, path in found.items():
        rows[row] = bench.work / "adapters" / f"s{seed}-{row}"
        if not rows[row].is_dir():  # the adapter's files only (not parts/ or a checkpoint's optimizer states)
            partial = rows[row].with_name(rows[row].name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for file in (f for f in path.iterdir() if f.is_file()):
                shutil.copy2(file, partial / file.name)
            partial.rename(rows[row])
    return rows


def main() -> int:
    from road_vlm.demo import pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=pipeline.default_workdir(),
                        help="the demo's work directory (its base and data are reused or built); results go to "
                        "WORKDIR/compose")
    parser.add_argument("--recipes", nargs="+", choices=(*RECIPES, LORA), default=None,
                        help="recipes to run (default: all; --quick: independent cotrained sequential lora); "
                        "independent always runs: every retention is measured against its gains")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="train.seed of each run (default 0 1; "
                        "--quick: 0)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per adapter")
    parser.add_argument("--num-eval", type=int, default=1000, help="questions per benchmark in the bench's eval set")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--road-lr", type=float, default=3e-2, help="RoAd learning rate (the demo's)")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA learning rate")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the questions")
    parser.add_argument("--quick", action="store_true", help="random tiny base, a few steps: pipeline check only")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.num_eval, args.num_processes, args.resamples = 2, 4, 1, 200
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    chosen = args.recipes or list(QUICK_RECIPES if args.quick else (*RECIPES, LORA))
    recipes = ["independent", *(r for r in dict.fromkeys(chosen) if r != "independent")]

    from road_vlm.eval.api import evaluate

    start = time.perf_counter()
    bench, eval_dir = prepare(args, recipes)
    accuracy, boots = {}, {}
    for seed in seeds:
        rows = seed_rows(bench, recipes, seed)
        print(f"== eval, seed {seed}", file=sys.stderr, flush=True)
        # One output folder for every seed (per eval set): the base row is answered once and reused.
        answers = bench.work / f"eval-{args.num_eval}"
        results = evaluate(model=bench.base, adapters=[None, *rows.values()], benchmarks=list(TASKS.values()),
                           data_root=eval_dir, output=answers, batch_size=16, progress=False,
                           max_new_tokens=8 if args.quick else None)
        names = {"base": "base", **{f"s{seed}-{row}": row for row in rows}}
        accuracy[f"seed{seed}"] = {row: {t: round(results["rows"][key][b]["accuracy"], 2) for t, b in TASKS.items()}
                                   for key, row in names.items()}
        boots[f"seed{seed}"] = {b: Bootstrap({row: question_scores(answers, eval_dir, key, b,
                                                                   results["rows"][key][b]["accuracy"])
                                              for key, row in names.items()}, args.resamples, seed=index)
                                for index, b in enumerate(TASKS.values())}
    judged = methods(recipes)
    by_method = {m: {seed: figures(spec, boot) for seed, boot in boots.items()} for m, spec in judged.items()}
    setup = {"base": str(bench.base), "seeds": seeds, "recipes": recipes, "steps_per_adapter": args.steps,
             "cotrained_steps": args.steps * len(TASKS), "processes": args.num_processes,
             "questions_per_benchmark": results["num_questions"], "road_lr": args.road_lr, "lora_lr": args.lora_lr,
             "bootstrap_resamples": args.resamples,
             "train_samples": {f"{kind}/{t}": len(json.loads(p.read_text()))
                               for kind, files in bench.task_files.items() for t, p in files.items()},
             "quick": args.quick}
    result = {"setup": setup, "accuracy": accuracy, "methods": by_method,
              "done_when": {m: done_when(by_seed) for m, by_seed in by_method.items()},
              "left_out": LEFT_OUT, "notes": {k: v for k, v in NOTES.items() if k in judged},
              "seconds": round(time.perf_counter() - start, 1)}
    (bench.work / "bench_compose.md").write_text(markdown(result) + "\n")
    print(markdown(result), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
