#!/usr/bin/env python
"""Training entry point: ``deepspeed scripts/train.py --config configs/demo.yaml [section.key=value ...]``.

Also runs under ``torchrun`` and plain ``python`` (a single process). All logic lives in road_vlm.train.
"""

import sys

from road_vlm.train.entry import main

if __name__ == "__main__":
    sys.exit(main())
