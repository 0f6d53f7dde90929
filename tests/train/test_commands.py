"""``road-vlm train`` registration and the deepspeed launcher command it builds."""

from __future__ import annotations

import argparse
import sys

import pytest

from road_vlm.train.commands import launcher_command, register


def test_train_subcommand_parses_config_overrides_and_process_count():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", "c.yaml", "train.seed=3", "--num-processes", "2"])
    assert (args.config, args.overrides, args.num_processes) == ("c.yaml", ["train.seed=3"], 2)
    args = parser.parse_args(["train", "--config", "c.yaml", "--num-gpus", "8", "--hostfile", "hosts"])
    assert (args.num_processes, args.hostfile) == (8, "hosts")


def test_launcher_runs_the_training_module_under_deepspeed():
    cmd = launcher_command("c.yaml", ["output.dir=x"], num_processes=2, hostfile="hosts", master_port=1234)
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert cmd[3:] == ["--hostfile", "hosts", "--num_gpus", "2", "--master_port", "1234", "--module",
                       "road_vlm.train.entry", "--config", "c.yaml", "output.dir=x"]


def _fp16_config(tmp_path, tiny_llava_dir):
    from train_helpers import demo_config, write_config

    config = demo_config(tiny_llava_dir, tmp_path / "data.json", tmp_path / "run", train={"fp16": True})
    return write_config(tmp_path / "fp16.yaml", config)


def _train_args(config_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", "--config", str(config_path), *extra])


def test_fp16_on_an_accelerator_without_it_is_refused_before_any_process_starts(
        tmp_path, tiny_llava_dir, monkeypatch, capsys):
    """A CPU without native fp16 (oneDNN): the launcher says so, names the key and what works, and starts nothing."""
    import subprocess

    import road_vlm.train.trainer as trainer
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: False)
    monkeypatch.setattr(get_accelerator(), "is_bf16_supported", lambda: True)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("the launcher must not start processes"))
    monkeypatch.setattr(trainer, "train", lambda config: pytest.fail("training must not start"))
    path = _fp16_config(tmp_path, tiny_llava_dir)
    for extra in (("--num-processes", "2"), ()):  # deepspeed launcher, and a single process in this interpreter
        args = _train_args(path, *extra)
        assert args.func(args) == 2
        err = capsys.readouterr().err
        assert "train.fp16=true" in err and "cannot train in float16" in err and str(path) in err, err
        assert "bf16 (train.bf16=true)" in err and "fp32" in err, err


def test_fp16_passes_the_check_where_the_accelerator_has_it(tmp_path, tiny_llava_dir, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from road_vlm.train.config import load_config
    from road_vlm.train.precision import check_training_precision

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    check_training_precision(load_config(str(_fp16_config(tmp_path, tiny_llava_dir)), []))
