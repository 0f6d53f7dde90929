#!/usr/bin/env python
"""Ship a rebuilt demo base: copy it into road_vlm/demo/assets/base with its manifest (settings, code version,
library versions, machine, SHA-256 of every file). For maintainers, after a change to the tiny base's recipe:

    road-vlm demo --workdir outputs/demo-base --rebuild-base --until base
    python scripts/ship_demo_base.py --workdir outputs/demo-base
    road-vlm demo --fresh      # then re-measure docs/demo.md's seed table from the new base
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from road_vlm.demo.pipeline import STAGES_FILE, Workdir
from road_vlm.demo.shipped_base import SHIPPED_BASE, ship_base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a demo workdir where --rebuild-base --until base ran")
    args = parser.parse_args()
    work = Workdir(Path(args.workdir))
    record = work.record()
    base = record.get("base")
    if base is None or base["result"].get("shipped", True):
        print(f"{work.root / STAGES_FILE}: no rebuilt base recorded; run `road-vlm demo --workdir {work.root} "
              "--rebuild-base --until base` first", file=sys.stderr)
        return 2
    settings = {"data": record["data"]["settings"], "base": base["settings"]}
    manifest = ship_base(work.base, settings, SHIPPED_BASE)
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
    print(f"{len(manifest['files'])} files -> {SHIPPED_BASE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
