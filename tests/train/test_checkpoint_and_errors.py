"""Checkpoint discovery/RNG round trip, and bad input that must stop training before it starts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from road_vlm.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_rng_state,
    resolve_resume,
    save_rng_state,
)
from road_vlm.train.config import ConfigError, config_from_dict
from train_helpers import demo_config, python_command, run_training, write_config


def _fake_checkpoint(out: Path, step: int) -> Path:
    from road_vlm.train.checkpoint import write_manifest

    ckpt = out / f"checkpoint-{step}"
    (ckpt / "deepspeed").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({"step": step}, ckpt / "deepspeed" / "mp_rank_00_model_states.pt")  # what DeepSpeed unpickles
    write_manifest(ckpt)
    return ckpt


def test_resume_auto_picks_newest_complete_checkpoint_and_ignores_partial_saves(tmp_path: Path):
    assert resolve_resume("auto", tmp_path) is None
    _fake_checkpoint(tmp_path, 5)
    _fake_checkpoint(tmp_path, 10)
    (tmp_path / ".tmp-checkpoint-15").mkdir()  # a save killed before its rename
    (tmp_path / "checkpoint-20").mkdir()  # no trainer state: not a checkpoint
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert resolve_resume("auto", tmp_path).name == "checkpoint-10"
    assert resolve_resume(str(tmp_path / "checkpoint-5"), tmp_path).name == "checkpoint-5"
    with pytest.raises(CheckpointError, match="resume=never"):
        resolve_resume("never", tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-20"), tmp_path)


class _Payload:  # what a planted pickle would run
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("tamper", ["no_manifest", "modified", "planted", "missing"])
def test_resume_refuses_checkpoints_road_vlm_did_not_write(tmp_path: Path, tamper: str):
    ckpt = _fake_checkpoint(tmp_path, 7)
    engine_file = ckpt / "deepspeed" / "mp_rank_00_model_states.pt"
    if tamper == "no_manifest":
        (ckpt / "road_vlm_manifest.json").unlink()
        needle = "no road_vlm_manifest.json"
    elif tamper == "modified":
        torch.save({"step": _Payload()}, engine_file)
        needle = "differs from the manifest"
    elif tamper == "planted":
        torch.save(_Payload(), ckpt / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        needle = "not in the manifest: deepspeed/zero_pp_rank_1"
    else:
        engine_file.unlink()
        needle = "in the manifest but missing"
    with pytest.raises(CheckpointError, match=needle) as info:
        resolve_resume("auto", tmp_path)
    assert "unpickles" in str(info.value)


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path: Path):
    from road_vlm.train.checkpoint import _rotate, list_checkpoints

    for step in (2, 4, 10, 6):
        _fake_checkpoint(tmp_path, step)
    _rotate(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 10]  # numeric order, not name order
    _rotate(tmp_path, None)
    assert len(list_checkpoints(tmp_path)) == 2


def test_rng_state_round_trips_without_pickle(tmp_path: Path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_rng_state(tmp_path, rank=0)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_rng_state(tmp_path, rank=0)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    with pytest.raises(CheckpointError, match="rng_state_1"):
        load_rng_state(tmp_path, rank=1)


def test_group_size_that_does_not_divide_a_layer_names_the_layer(tiny_llava_dir: Path):
    from road_vlm.train.model_setup import load_model_with_adapter

    config = config_from_dict({"model": {"name_or_path": str(tiny_llava_dir)}, "data": {"path": "x.json"},
                               "output": {"dir": "o"}, "adapter": {"variant": "road4", "group_size": 48}})
    with pytest.raises(ConfigError, match=r"group_size 48 does not divide d_out=64 of layer model\.language_model\."):
        load_model_with_adapter(config)


@pytest.mark.slow
def test_bad_data_stops_before_training_and_keeps_existing_checkpoints(
    tiny_llava_dir: Path, synthetic_data: Path, tmp_path: Path
):
    records = json.loads(synthetic_data.read_text())
    records[7]["conversations"] = records[7]["conversations"][1:]  # starts with a gpt turn
    bad = synthetic_data.parent / "bad.json"
    bad.write_text(json.dumps(records, indent=1))
    out = tmp_path / "run"
    previous = _fake_checkpoint(out, 5)
    before = sorted(p.name for p in previous.iterdir())
    config = write_config(tmp_path / "c.yaml", demo_config(tiny_llava_dir, bad, out))
    result = run_training(python_command(config))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"bad.json record 7 (id {records[7]['id']}): turn 0 is from 'gpt'" in result.stderr
    assert sorted(p.name for p in previous.iterdir()) == before
    assert [p.name for p in out.iterdir()] == ["checkpoint-5"]
