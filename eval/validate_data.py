#!/usr/bin/env python
"""Validate a benchmark data root laid out as in eval/README.md before running `road-vlm eval`.

    python eval/validate_data.py --data-root playground/data/eval [--benchmarks gqa,pope] [--pope-images DIR]

Checks that every file is present and parses, every question has its annotation and image, POPE's
label files line up with the questions, and compares the question counts with the releases behind
the LLaVA-1.5 numbers. Exit status 0 = usable (a count mismatch is only a warning: the numbers
will then not be comparable with the paper), 1 = a problem (the message names the file).
"""

from __future__ import annotations

import argparse
import sys

from road_vlm.eval.benchmarks import BENCHMARKS, parse_benchmarks
from road_vlm.eval.common import EvalDataError
from road_vlm.eval.validate import OFFICIAL_COUNTS, validate_data_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    for name, module in BENCHMARKS.items():
        parser.add_argument(f"--{name}-images", default=None, help=f"default {module.DEFAULT_IMAGE_DIR}")
    args = parser.parse_args(argv)
    image_dirs = {n: getattr(args, f"{n}_images") for n in BENCHMARKS if getattr(args, f"{n}_images")}
    try:
        report = validate_data_root(args.data_root, parse_benchmarks(args.benchmarks), image_dirs)
    except (EvalDataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, info in report.items():
        counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
        if info["official"]:
            print(f"ok       {name:10s} {counts} (matches the LLaVA-1.5 release)")
        else:
            official = ", ".join(f"{k} {v}" for k, v in OFFICIAL_COUNTS[name].items())
            print(f"warning  {name:10s} {counts}; the LLaVA-1.5 release has {official}: scores will not be "
                  "comparable with the paper")
    return 0


if __name__ == "__main__":
    sys.exit(main())
