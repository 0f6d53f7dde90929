"""``road-vlm board``: a real run's curves and its eval table across checkpoints, read-only and escaped."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from road_vlm.board.commands import board_html, create_board_app
from road_vlm.board.runs import scan

LOCAL = "http://127.0.0.1"


@pytest.mark.slow
def test_board_shows_a_runs_curves_facts_and_eval_table_across_checkpoints(board_outputs: Path, tmp_path: Path):
    run = board_outputs / "road4-run"
    summary = json.loads((run / "summary.json").read_text())
    board = scan([board_outputs])
    assert [r.path for r in board.runs] == [run] and board.evals == [] and board.problems == []
    assert [e.path for e in board.runs[0].evals] == [board_outputs / "road4-eval"]

    with TestClient(create_board_app([board_outputs]), base_url=LOCAL) as client:
        page = client.get("/")
        foreign = client.get("/", headers={"host": "evil.example"})
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assert foreign.status_code == 421
    html = page.text
    assert f"{summary['trainable_parameters']:,}" in html and str(run) in html
    # Loss and learning-rate curves: one point per optimizer step.
    assert re.findall(r'data-name="(loss|lr)" data-points="(\d+)"', html) == [("loss", "4"), ("lr", "4")]
    # The eval table lists the base and both checkpoints; one chart per benchmark over the checkpoints.
    table = html[html.index('class="eval-table"'):]
    assert [row for row in ("base", "checkpoint-2", "checkpoint-4") if f"<td>{row}</td>" in table] == [
        "base", "checkpoint-2", "checkpoint-4"]
    # (base at step 0, then steps 2 and 4)
    assert len(re.findall(r'data-name="(GQA|SQA-IMG|TextVQA|POPE)" data-points="3"', html)) == 4
    assert "<script" not in html

    # Names from disk are escaped; a results.json that is not road_vlm's is listed, not guessed at.
    odd = tmp_path / "outputs" / "<img src=x onerror=alert(1)>"
    shutil.copytree(run, odd)
    (tmp_path / "outputs" / "other").mkdir()
    (tmp_path / "outputs" / "other" / "results.json").write_text('{"accuracy": 1}')
    html = board_html([tmp_path / "outputs"])
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "not a road_vlm results file" in html
