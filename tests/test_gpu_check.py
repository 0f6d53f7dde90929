"""scripts/gpu_check.sh --dry-run: every stage of the one-shot GPU check runs at smoke size on the CPU, so the
script cannot rot between the rare sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_and_writes_the_report(tmp_path: Path):
    env = dict(os.environ, PYTHON=sys.executable, DS_ACCELERATOR="cpu")
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [report_file] = tmp_path.glob("*-cpu-dry-run.json")
    report = json.loads(report_file.read_text())
    assert report["dry_run"] is True
    assert {name: stage["ok"] for name, stage in report["stages"].items()} == {
        "environment": True, "cuda-tests": True, "adapters": True, "adapters-graphs": True, "train": True,
        "serving": True}
    assert report["stages"]["adapters-graphs"]["status"].startswith("skipped: needs a GPU")
    assert report["stages"]["adapters"]["result"]["forward"]
    assert [row["method"] for row in report["stages"]["train"]["result"]["results"]] == ["road4", "road4_nf4"]
    assert not any("error" in row for row in report["stages"]["train"]["result"]["results"])
    assert report["stages"]["serving"]["result"]["tokens_per_s"]["road_vlm_road4"]
    markdown = report_file.with_suffix(".md").read_text()
    assert "## Adapter layer forward" in markdown and "## Generation throughput" in markdown


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry_run(tmp_path: Path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path)], cwd=REPO,
                            env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no CUDA device" in result.stderr
    assert not list(tmp_path.iterdir())


def _gpu_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_report", REPO / "scripts" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_stages(stages: Path, graphs_status: str, graphs_out: str = "") -> None:
    stages.mkdir()
    (stages / "environment.status").write_text("ok 1s")
    (stages / "environment.out").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.13.0"}))
    for name in ("cuda-tests", "adapters", "train", "serving"):
        (stages / f"{name}.status").write_text("ok 1s")
    (stages / "adapters-graphs.status").write_text(graphs_status)
    (stages / "adapters-graphs.out").write_text(graphs_out)


def test_the_report_shows_graph_timings_and_which_candidate_a_graph_cannot_hold(tmp_path: Path):
    row = {"layer": "4096x4096", "shape": "decode (batch 32 x 1 tok)", "distinct_adapters": 32, "cuda_graphs": True,
           "base_ms": 0.02, "road_vlm_road4_ms": 0.022, "road_vlm_road4_overhead_pct": 9.5,
           "peft_lora_r16_ms": 0.05, "peft_lora_r16_overhead_pct": 150.0, "peft_road4_ms": None,
           "peft_road4_overhead_pct": None, "not_capturable": {"peft_road4": "RuntimeError: operation not permitted"}}
    _write_stages(tmp_path / "stages", "ok 40s", json.dumps({"dtype": "bfloat16", "forward": [row], "merge": []}))
    gpu_report = _gpu_report()
    assert gpu_report.main(["--stages", str(tmp_path / "stages"), "--out", str(tmp_path / "out"),
                            "--seconds", "300"]) == 0
    [markdown] = (tmp_path / "out").glob("*-nvidia-h100-80gb-hbm3.md")
    text = markdown.read_text()
    table = text[text.index("## Adapter layer forward inside CUDA graphs"):]
    assert "| 0.022 (9.5%) |" in table and "not capturable: RuntimeError: operation not permitted" in table


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_gpu_only_stage_skipped_is_ok_only_in_a_dry_run(tmp_path: Path, dry_run: bool):
    _write_stages(tmp_path / "stages", "skipped: needs a GPU (CUDA graphs)")
    gpu_report = _gpu_report()
    stages = gpu_report.read_stages(tmp_path / "stages", dry_run=dry_run)
    assert stages["adapters-graphs"]["ok"] is dry_run
    assert [name for name, stage in stages.items() if not stage["ok"]] == ([] if dry_run else ["adapters-graphs"])
