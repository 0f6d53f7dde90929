#!/usr/bin/env python
"""Data at LLaVA-1.5 scale: time and host memory to validate and index a 665k-record instruction file and reach
the first optimizer step with 2 ranks (samples are tokenised on access, in the DataLoader).

Writes a synthetic file in ``llava_v1_5_mix665k.json``'s format (one JSON array; image records with
``coco/train2017/...``-style paths and up to 8 question/answer rounds, about a third text-only ShareGPT-style
records with a ``model`` field and long answers; image files are a small shared pool, as the real file reuses
COCO images), then runs the real recipe (``configs/demo.yaml`` on a tiny random base, ``data.max_length`` 2048,
modality-grouped sampling, ``deepspeed --num_gpus 2``, one step) and samples every rank's resident memory.

    python scripts/bench_data.py                  # 665,000 records (1.45 GB file)
    python scripts/bench_data.py --quick          # 3,000 records: checks the script runs

Prints one JSON object. Targets (issue 17): first step in under 5 minutes, peak RSS under 4 GB per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import REPO

GIB = 2 ** 30
IMAGE_DIRS = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K")


def _words() -> list[str]:
    from road_vlm.demo.synthetic import tokenizer_corpus

    return sorted({w.strip(".,?!:;()") for line in tokenizer_corpus() for w in line.split()} - {""})


def _sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def write_mix(path: Path, image_root: Path, num_records: int, *, seed: int = 0, pool: int = 200) -> dict:
    """The synthetic mix665k-format file; returns its shape (records, text-only share, rounds, bytes)."""
    from PIL import Image

    rng = random.Random(seed)
    words = _words()
    images = []
    for i in range(pool):
        rel = f"{IMAGE_DIRS[i % len(IMAGE_DIRS)]}/{i:012d}.jpg"
        (image_root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64 + i % 7 * 16, 48 + i % 5 * 16), (i * 37 % 256, i * 91 % 256, i * 13 % 256)).save(
            image_root / rel, format="JPEG")
        images.append(rel)
    text_only = rounds = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(num_records):
            record: dict = {"id": f"{i:012d}"}
            turns = []
            if rng.random() < 1 / 3:  # ShareGPT-style text-only chat: few rounds, long answers
                text_only += 1
                record["model"] = ""
                for _ in range(rng.randint(1, 4)):
                    turns += [{"from": "human", "value": _sentence(rng, words, rng.randint(8, 40)) + "?"},
                              {"from": "gpt", "value": _sentence(rng, words, rng.randint(60, 400)) + "."}]
            else:
                record["image"] = rng.choice(images)
                for r in range(rng.choice((1, 1, 2, 3, 4, 6, 8))):
                    question = _sentence(rng, words, rng.randint(5, 15)) + "?"
                    long = rng.random() < 0.3
                    answer = _sentence(rng, words, rng.randint(60, 250) if long else rng.randint(1, 8))
                    turns += [{"from": "human", "value": ("<image>\n" if r == 0 else "") + question},
                              {"from": "gpt", "value": answer}]
            rounds += len(turns) // 2
            record["conversations"] = turns
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")
    return {"records": num_records, "text_only": text_only, "mean_rounds": round(rounds / num_records, 2),
            "file_bytes": path.stat().st_size}


class _RankMemory(threading.Thread):
    """Samples the resident memory of every training process (children of the launcher) every 0.2 s."""

    def __init__(self, launcher_pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.launcher = psutil.Process(launcher_pid)
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                for child in self.launcher.children(recursive=True):
                    if "--local_rank" in " ".join(child.cmdline()):  # the ranks, not the launcher
                        self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), child.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)


def run_first_step(base: Path, data: Path, image_folder: Path, out: Path, max_length: int) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO))
    with socket.socket() as probe:  # a free port: another run on this machine may hold DeepSpeed's default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "scripts/train.py",
           "--config", "configs/demo.yaml", f"model.name_or_path={base}",
           f"data.path={data}", f"data.image_folder={image_folder}", f"data.max_length={max_length}",
           f"output.dir={out}", "output.report_to=none",
           "train.max_steps=1", "train.verify_final_adapter=false", "adapter.train_projector=false"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = _RankMemory(proc.pid)
    memory.start()
    output, _ = proc.communicate(timeout=3600)
    wall = time.perf_counter() - start
    memory.stop.set()
    if proc.returncode != 0:
        raise RuntimeError("training failed:\n" + output[-4000:])
    summary = json.loads((out / "summary.json").read_text())
    return {
        "seconds_to_first_step": round(summary["seconds_to_first_step"], 1),
        "data_seconds": round(summary["data_load"]["seconds"], 1),
        "launch_to_exit_seconds": round(wall, 1),
        "rank0_peak_rss_after_data_gib": round(summary["data_load"]["host_peak_rss_bytes"] / GIB, 3),
        "peak_rss_per_rank_gib": sorted(round(v / GIB, 3) for v in memory.peaks.values()),
        "samples": summary["data"]["num_samples"],
        "dropped": summary["data"]["num_dropped"],
        "text_truncated_in_first_step": summary["truncated_samples"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--max-length", type=int, default=1024, help="data.max_length (the tiny base's context)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the file and runs here (default: temp)")
    parser.add_argument("--quick", action="store_true", help="3,000 records")
    args = parser.parse_args()
    records = 3000 if args.quick else args.records

    from road_vlm.demo.synthetic import tokenizer_corpus
    from road_vlm.demo.tiny_base import build_tiny_llava

    with tempfile.TemporaryDirectory(prefix="road_vlm_bench_data_") as tmp:
        work = args.workdir or Path(tmp)
        data = work / f"mix{records}.json"
        start = time.perf_counter()
        shape = write_mix(data, work / "images", records)
        shape["write_seconds"] = round(time.perf_counter() - start, 1)
        base = build_tiny_llava(work / "base", corpus=tokenizer_corpus())
        result = run_first_step(base, data, work / "images", work / "run", args.max_length)
    print(json.dumps({"data": shape, "max_length": args.max_length, "ranks": 2, **result,
                      "targets": {"seconds_to_first_step": 300, "peak_rss_per_rank_gib": 4.0}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
