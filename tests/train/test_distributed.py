"""Process-group setup: what a run leaves behind on the machine, and what it finds there."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from road_vlm.train import distributed


def test_a_build_lock_left_by_a_killed_process_is_removed_and_a_live_one_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    live = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - distributed.STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))
    distributed._remove_stale_build_locks()
    assert not stale.exists() and live.exists()
    assert str(stale) in caplog.text


def test_the_cpu_allreduce_segment_is_named_as_deepspeed_names_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    segment = distributed.cpu_allreduce_segment(1)
    assert segment == Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29555_1")
