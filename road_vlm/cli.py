"""The ``road-vlm`` command. Subcommands are thin wrappers; each area registers its own in ``commands.py``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, what it registers) — the order is the order in --help.
_COMMAND_MODULES = (
    "road_vlm.convert.commands", # build-base, convert-llava
    "road_vlm.train.commands",   # train
    "road_vlm.eval.commands",    # eval, score
    "road_vlm.serve.commands",   # chat, chat-ui, merge, export, compose, serve
    "road_vlm.board.commands",   # board
    "road_vlm.demo.commands",    # demo
)


def build_parser() -> argparse.ArgumentParser:
    from road_vlm import __version__

    parser = argparse.ArgumentParser(
        prog="road-vlm",
        description="Finetune LLaVA-1.5 with RoAd adapters, evaluate, chat and serve many adapters in one batch.",
    )
    parser.add_argument("--version", action="version", version=f"road-vlm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
