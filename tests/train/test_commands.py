"""``road-vlm train`` registration and the deepspeed launcher command it builds."""

from __future__ import annotations

import argparse
import sys

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
