"""``road-vlm demo``: the whole pipeline on an embedded default, on CPU, in minutes.

1. data: synthetic shape/colour/sign images, instruction data and the four benchmarks in LLaVA's eval layout
2. base: a tiny LLaVA-1.5-architecture base (real ``LlavaForConditionalGeneration``, real tokenizer files) in HF
   format — the stand-in for the CLIP + Vicuna + stage-1 checkpoint a real run starts from. By default the one
   shipped with the source (``road_vlm/demo/assets/base``, checked against its manifest), as a real user
   downloads Vicuna; ``rebuild_base`` builds it from scratch with a short full-parameter pretraining (text-only
   instructions, then captions)
3. train: RoAd4 (+ projector) training with ``deepspeed`` on 2 CPU processes — exactly the training recipe, with
   configs/demo.yaml
4. eval: the base and the tuned model on the four synthetic benchmarks; before/after table and chart
5. chat: one question about a demo image, through the same loader chat uses, next to the image's true content

Each stage is timed and cached under the work directory with the settings it was built with: a second run reuses
what the first built, a stage whose settings changed is rebuilt together with every stage after it, and
``--fresh`` rebuilds everything. The chat question is asked again on every run (one short generation).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from road_vlm.data.template import SYSTEM_V1
from road_vlm.demo.report import before_after_chart, before_after_table, headline, pope_balance
from road_vlm.demo.shipped_base import SHIPPED_BASE, read_manifest, verify_shipped_base

STAGES = ("data", "base", "train", "eval", "chat")
STAGES_FILE = "stages.json"  # per stage: the settings it was built with and how long it took
CHAT_QUESTION = "What color is the shape? Answer the question using a single word or phrase."


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides what the demo builds (a stage is reused only when its part is unchanged)."""

    num_train: int = 4000
    num_eval: int = 150  # questions per benchmark (POPE: per category); enough that a 15-point change is no noise
    # The tiny base's two pretraining phases: its language model on text (yes/no questions, which compare the
    # question with the scene, need the most steps), then vision tower + projector on captions.
    text_steps: int = 2500
    caption_steps: int = 1500
    num_processes: int = 2
    # Threads per training process (None: the cores shared out between the processes). Another thread count
    # changes the order of floating-point sums, the stand-in for another CPU's arithmetic.
    threads_per_process: int | None = None
    # False: the shipped base (road_vlm/demo/assets/base); True: pretrain one from scratch with the settings below.
    rebuild_base: bool = False
    train_overrides: tuple[str, ...] = ()
    eval_batch_size: int = 16
    # The tiny base: big enough for RoAd4 (+ projector) to learn the synthetic tasks in a few CPU minutes.
    base: dict[str, int] = field(default_factory=lambda: {"hidden_size": 128, "num_layers": 4, "vision_layers": 3,
                                                          "image_size": 48})

    def base_settings(self) -> dict[str, Any]:
        """What a rebuilt base depends on (the shipped base's manifest records them)."""
        return {"text_steps": self.text_steps, "caption_steps": self.caption_steps, "base": self.base}

    def stage_settings(self) -> dict[str, dict[str, Any]]:
        """What each stage depends on, beyond the stages before it."""
        return {
            "data": {"num_train": self.num_train, "num_eval": self.num_eval},
            "base": self.base_settings() if self.rebuild_base else {"shipped": read_manifest()["files"]},
            "train": {"num_processes": self.num_processes, "threads_per_process": self.threads_per_process,
                      "overrides": list(self.train_overrides),
                      "config": _config_path().read_text()},
            "eval": {"batch_size": self.eval_batch_size},
            "chat": {"question": CHAT_QUESTION},
        }


def default_workdir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "road_vlm" / "demo"


def _config_path() -> Path:
    """configs/demo.yaml of the source tree (the demo runs the real recipe with the real config)."""
    path = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the demo from a source checkout (pip install -e .)")
    return path


class Workdir:
    """The demo's folders and its stage record (``stages.json``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.train_data = root / "data" / "train"
        self.eval_data = root / "data" / "eval"
        self.base = root / "base"
        self.run = root / "run"
        self.eval = root / "eval"

    def record(self) -> dict[str, Any]:
        path = self.root / STAGES_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_record(self, record: dict[str, Any]) -> None:
        tmp = self.root / (STAGES_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.root / STAGES_FILE)

    def outputs(self, stage: str) -> list[Path]:
        """What a stage writes (removed before it is rebuilt, so nothing stale is resumed)."""
        return {"data": [self.root / "data"], "base": [self.base, self.root / "base-init"], "train": [self.run],
                "eval": [self.eval], "chat": []}[stage]


def prepare_data(work: Workdir, settings: DemoSettings) -> dict[str, Any]:
    from road_vlm.demo.synthetic import generate_eval_data, generate_training_data

    generate_training_data(work.train_data, seed=0, num_samples=settings.num_train)
    generate_eval_data(work.eval_data, seed=1, num_per_benchmark=settings.num_eval)
    return {"train": str(work.train_data / "instruct.json"), "eval": str(work.eval_data)}


def prepare_base(work: Workdir, settings: DemoSettings) -> dict[str, Any]:
    """The tiny base in HF format: the shipped one (checked against its manifest), or built and pretrained."""
    if not settings.rebuild_base:
        manifest = verify_shipped_base(SHIPPED_BASE)
        shutil.copytree(SHIPPED_BASE, work.base)
        print(f"   the shipped base ({SHIPPED_BASE}), built {manifest['date']} from {manifest['code_version']}; "
              "`road-vlm demo --rebuild-base` builds one from scratch", flush=True)
        return {"base": str(work.base), "shipped": True}
    from road_vlm.demo.synthetic import tokenizer_corpus
    from road_vlm.demo.tiny_base import build_tiny_llava, pretrain_tiny_llava

    init = build_tiny_llava(work.root / "base-init", corpus=tokenizer_corpus() + [SYSTEM_V1], overwrite=True,
                            **settings.base)
    pretrain_tiny_llava(init, work.train_data / "pretrain_text.json", work.train_data / "pretrain.json", work.base,
                        text_steps=settings.text_steps, caption_steps=settings.caption_steps)
    shutil.rmtree(init)
    return {"base": str(work.base), "shipped": False}


def train_adapter(work: Workdir, settings: DemoSettings) -> dict[str, Any]:
    """The real recipe (configs/demo.yaml) on the demo's base and data, in its own ``deepspeed`` processes."""
    from road_vlm.train.commands import launcher_command

    overrides = [f"model.name_or_path={work.base}", f"data.path={work.train_data / 'instruct.json'}",
                 f"output.dir={work.run}", *settings.train_overrides]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    if settings.threads_per_process is not None:
        env["OMP_NUM_THREADS"] = str(settings.threads_per_process)
    if settings.num_processes > 1:
        cmd = launcher_command(str(_config_path()), overrides, num_processes=settings.num_processes)
    else:
        cmd = [sys.executable, "-m", "road_vlm.train.entry", "--config", str(_config_path()), *overrides]
    print("   $ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise RuntimeError(f"training failed with exit code {code} (its output so far is kept in {work.run})")
    summary = json.loads((work.run / "summary.json").read_text())
    return {"checkpoint": summary["final_checkpoint"], "loss_curve": str(work.run / "loss.png"),
            "trainable_parameters": summary["trainable_parameters"],
            "first_loss": summary["first_loss"], "last_loss": summary["last_loss"]}


def evaluate_before_after(work: Workdir, settings: DemoSettings, checkpoint: Path) -> dict[str, Any]:
    from road_vlm.eval.api import evaluate

    results = evaluate(model=work.base, adapters=[None, checkpoint], data_root=work.eval_data, output=work.eval,
                       batch_size=settings.eval_batch_size)
    rows = results["rows"]["base"], results["rows"][checkpoint.name]
    before, after = (headline(row) for row in rows)
    (work.eval / "before_after.md").write_text(before_after_table(before, after) + "\n")
    before_after_chart(before, after, work.eval / "before_after.png", num_questions=results["num_questions"])
    return {"base": before, "tuned": after, "num_questions": results["num_questions"],
            "pope": dict(zip(("base", "tuned"), (pope_balance(row) for row in rows))),
            "chart": str(work.eval / "before_after.png"), "table": str(work.eval / "before_after.md")}


def chat_once(work: Workdir, checkpoint: Path) -> dict[str, Any]:
    """Ask the tuned model the colour of a one-shape eval image and compare with what the image really shows."""
    from road_vlm.demo.synthetic import caption, load_specs
    from road_vlm.model import load_vlm
    from road_vlm.serve.chat import ChatSession

    specs = load_specs(work.eval_data)
    rel, spec = next((rel, spec) for rel, spec in sorted(specs.items())
                     if rel.startswith("gqa/") and len(spec.shapes) == 1)
    image = work.eval_data / rel
    session = ChatSession(load_vlm(work.base, checkpoint), adapter=str(checkpoint))
    session.set_image(image)
    print(f"   image: {image}\n   (what it shows: {caption(spec)})\n   USER: {CHAT_QUESTION}\n   ASSISTANT: ",
          end="", flush=True)
    answer = session.ask(CHAT_QUESTION, on_text=lambda piece: print(piece, end="", flush=True)).text
    expected = spec.shapes[0].color
    correct = answer.strip().rstrip(".").lower() == expected
    print(f"\n   expected: {expected} -> {'right' if correct else 'wrong'}", flush=True)
    return {"image": str(image), "image_content": caption(spec), "question": CHAT_QUESTION, "answer": answer,
            "expected": expected, "correct": correct}


def run_demo(workdir: Path, settings: DemoSettings | None = None, *, fresh: bool = False,
             until: str = "chat") -> dict[str, Any]:
    """Run the stages up to ``until`` (reusing cached ones unless ``fresh``); returns the demo summary, also
    written to ``workdir/demo_summary.json``."""
    settings = settings or DemoSettings()
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    work = Workdir(workdir)
    work.root.mkdir(parents=True, exist_ok=True)
    record = {} if fresh else work.record()
    wanted = settings.stage_settings()
    results: dict[str, Any] = {}
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "data": lambda: prepare_data(work, settings),
        "base": lambda: prepare_base(work, settings),
        "train": lambda: train_adapter(work, settings),
        "eval": lambda: evaluate_before_after(work, settings, Path(results["train"]["checkpoint"])),
        "chat": lambda: chat_once(work, Path(results["train"]["checkpoint"])),
    }
    titles = {"data": f"synthetic data -> {work.root / 'data'}", "base": f"tiny LLaVA-1.5 base -> {work.base}",
              "train": f"RoAd4 training, deepspeed on {settings.num_processes} process(es) -> {work.run}",
              "eval": f"eval of the base and the tuned model -> {work.eval}", "chat": "chat with the tuned model"}
    seconds: dict[str, float] = {}
    reused: list[str] = []
    stale = False  # once a stage is rebuilt, every later stage is too
    total_start = time.perf_counter()
    for index, stage in enumerate(STAGES[: STAGES.index(until) + 1], start=1):
        print(f"\n== {index}/{len(STAGES)} {titles[stage]}", flush=True)
        cached = record.get(stage)
        if not stale and cached is not None and cached["settings"] == wanted[stage] and stage != "chat":
            results[stage] = cached["result"]
            seconds[stage] = 0.0
            reused.append(stage)
            print(f"   reused (built in {cached['seconds']:.0f} s; `road-vlm demo --fresh` rebuilds)", flush=True)
            continue
        stale = True
        for path in work.outputs(stage):
            shutil.rmtree(path, ignore_errors=True)
        record.pop(stage, None)
        start = time.perf_counter()
        results[stage] = steps[stage]()
        seconds[stage] = round(time.perf_counter() - start, 1)
        record[stage] = {"settings": wanted[stage], "result": results[stage], "seconds": seconds[stage]}
        for later in STAGES[STAGES.index(stage) + 1:]:
            record.pop(later, None)
        work.save_record(record)
        print(f"   done in {seconds[stage]:.0f} s", flush=True)

    summary = {"workdir": str(work.root), "settings": asdict(settings),
               "stage_seconds": seconds, "total_seconds": round(time.perf_counter() - total_start, 1),
               "stages_reused": reused, **_summary_parts(results)}
    (work.root / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    return summary


def _summary_parts(results: dict[str, Any]) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    if "train" in results:
        parts["checkpoint"] = results["train"]["checkpoint"]
        parts["loss_curve"] = results["train"]["loss_curve"]
    if "eval" in results:
        parts.update(base=results["eval"]["base"], tuned=results["eval"]["tuned"],
                     num_questions=results["eval"]["num_questions"], pope=results["eval"]["pope"],
                     chart=results["eval"]["chart"])
    if "chat" in results:
        parts["chat"] = results["chat"]
    return parts


def _print_summary(summary: dict[str, Any]) -> None:
    print("\n== summary", flush=True)
    if "base" in summary:
        print(before_after_table(summary["base"], summary["tuned"]))
        print(f"   questions per benchmark: {summary['num_questions']}")
        print("   POPE accuracy / yes-ratio (mean of its 3 categories): " + ", ".join(
            f"{who} {m['accuracy']:.1f} / {m['yes_ratio']:.1f} %" for who, m in summary["pope"].items()))
    if "chat" in summary:
        chat = summary["chat"]
        print(f"   chat: {chat['question']!r} -> {chat['answer']!r} (the image: {chat['image_content']})")
    for key, label in (("loss_curve", "loss curve"), ("chart", "before/after chart")):
        if key in summary:
            print(f"   {label}: {summary[key]}")
    times = ", ".join(f"{s} {t:.0f} s" + (" (reused)" if s in summary["stages_reused"] else "")
                      for s, t in summary["stage_seconds"].items())
    print(f"   stages: {times}\n   demo finished in {summary['total_seconds']:.0f} s; everything is under "
          f"{summary['workdir']}", flush=True)
