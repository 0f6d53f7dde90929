"""``road-vlm train``: train in this process, or launch ``deepspeed`` with N processes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from road_vlm.train.config import ConfigError, load_config
from road_vlm.train.distributed import free_port
from road_vlm.train.entry import add_arguments, run
from road_vlm.train.precision import check_training_precision


def launcher_command(
    config: str, overrides: list[str], *, num_processes: int, hostfile: str | None = None,
    master_port: int | None = None,
) -> list[str]:
    """The ``deepspeed`` launcher command line that runs ``road_vlm.train.entry`` on N processes per node.

    On one node without a chosen port, a free one: the launcher's fixed default (29500) makes a second run on the
    same machine fail with EADDRINUSE. Several nodes must agree on a port, so there the default stays.
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    elif master_port is None:
        master_port = free_port()
    cmd += ["--num_gpus", str(num_processes)]
    if master_port is not None:
        cmd += ["--master_port", str(master_port)]
    cmd += ["--module", "road_vlm.train.entry", "--config", config, *overrides]
    return cmd


def _command(args: argparse.Namespace) -> int:
    if args.num_processes is None and not args.hostfile:
        return run(args.config, args.overrides)
    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:  # say so before starting N processes that would each load the model and then fail
        check_training_precision(load_config(args.config, args.overrides), args.config)
    except ConfigError as err:
        print(f"road_vlm train error: {err}", file=sys.stderr, flush=True)
        return 2
    env = dict(os.environ)
    cmd = launcher_command(args.config, args.overrides, num_processes=args.num_processes or 1,
                           hostfile=args.hostfile, master_port=args.master_port)
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def register(subparsers: Any) -> None:
    """Add ``train`` to the ``road-vlm`` command."""
    parser = subparsers.add_parser(
        "train",
        help="finetune LLaVA-1.5 with a RoAd/LoRA adapter",
        description="Train as configured by a YAML file. Without --num-processes the run is single-process in "
        "this interpreter; with it, the deepspeed launcher starts N processes per node (GPUs, or CPU processes "
        "with DS_ACCELERATOR=cpu).",
    )
    add_arguments(parser)
    parser.add_argument("--num-gpus", "--num-processes", dest="num_processes", type=int, default=None,
                        help="processes per node to launch with deepspeed")
    parser.add_argument("--hostfile", default=None, help="deepspeed hostfile for multi-node runs")
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port for the launcher")
    parser.set_defaults(func=_command)
