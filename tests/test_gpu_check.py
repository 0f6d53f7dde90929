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
        "environment": True, "cuda-tests": True, "adapters": True, "train": True, "serving": True}
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
