"""Command-line entry of one training process: ``python -m road_vlm.train.entry --config X [key=value ...]``.

The same function serves ``deepspeed scripts/train.py``, ``torchrun scripts/train.py`` and plain ``python``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from road_vlm.train.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Finetune LLaVA-1.5 with a RoAd/LoRA adapter (DeepSpeed).")
    add_arguments(parser)
    # The deepspeed launcher passes --local_rank (also as LOCAL_RANK in the environment, which is what we read).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (see configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. train.learning_rate=1e-3 output.dir=runs/x")


def run(config_path: str, overrides: list[str]) -> int:
    """Load the config and train in this process; bad input becomes a one-line error and exit code 2."""
    from road_vlm.adapters import AdapterConfigError
    from road_vlm.data.records import DataError
    from road_vlm.data.images import ImageLoadError
    from road_vlm.train.checkpoint import CheckpointError
    from road_vlm.train.ds_config import DeepSpeedConfigError
    from road_vlm.train.precision import check_training_precision
    from road_vlm.train.trainer import train

    try:
        config = load_config(config_path, overrides)
        check_training_precision(config, config_path)
        train(config)
    except (ConfigError, DataError, ImageLoadError, CheckpointError, DeepSpeedConfigError, AdapterConfigError) as err:
        rank = os.environ.get("RANK", "0")
        print(f"road_vlm train error [rank {rank}]: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return run(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
