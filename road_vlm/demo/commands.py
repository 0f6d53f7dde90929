"""``road-vlm demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from road_vlm.demo import pipeline


def _command(args: argparse.Namespace) -> int:
    steps = {key: value for key, value in (("text_steps", args.text_steps), ("caption_steps", args.caption_steps))
             if value is not None}
    if steps and not args.rebuild_base:
        args.parser.error("--text-steps and --caption-steps set how a base is pretrained: they need --rebuild-base "
                          "(the shipped base is used as it is)")
    settings = pipeline.DemoSettings(num_processes=args.num_processes, num_eval=args.num_eval,
                                     rebuild_base=args.rebuild_base, threads_per_process=args.threads_per_process,
                                     train_overrides=tuple(args.overrides), **steps)
    pipeline.run_demo(Path(args.workdir).expanduser(), settings, fresh=args.fresh, until=args.until)
    return 0


def register(subparsers: Any) -> None:
    """Add ``demo`` to the ``road-vlm`` command."""
    defaults = pipeline.DemoSettings()
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on a tiny model and synthetic data (CPU, a few minutes)",
        description=pipeline.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", default=str(pipeline.default_workdir()),
                        help="where data/, base/, run/ and eval/ go (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="rebuild every stage instead of reusing cached ones")
    parser.add_argument("--until", choices=pipeline.STAGES, default="chat",
                        help="stop after this stage (e.g. 'base': prepare the assets configs/demo.yaml trains on)")
    parser.add_argument("--num-processes", type=int, default=defaults.num_processes,
                        help="deepspeed processes for training (default: %(default)s)")
    parser.add_argument("--threads-per-process", type=int, default=None,
                        help="torch threads of each training process (default: the cores shared out)")
    parser.add_argument("--rebuild-base", action="store_true",
                        help="pretrain the tiny base from scratch (a few minutes) instead of using the one shipped "
                             "in road_vlm/demo/assets/base")
    parser.add_argument("--text-steps", type=int, default=None,
                        help=f"with --rebuild-base: steps of the tiny base's language-model pretraining on text "
                             f"(default: {defaults.text_steps})")
    parser.add_argument("--caption-steps", type=int, default=None,
                        help=f"with --rebuild-base: steps of the tiny base's vision + projector alignment on "
                             f"captions (default: {defaults.caption_steps})")
    parser.add_argument("--num-eval", type=int, default=defaults.num_eval,
                        help="questions per benchmark (POPE: per category; default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="training config overrides, e.g. train.max_steps=100")
    parser.set_defaults(func=_command, parser=parser)
