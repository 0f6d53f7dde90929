#!/usr/bin/env python
"""Stand-alone reproduction (torch only) of a CPU slow path, for a PyTorch bug report.

``F.linear`` on a *strided* 3-D input with a weight that does not require grad is far slower than on the same
input made contiguous. transformers' generate() hits it at every decode step: LLaVA/Llama feed their
lm_head ``hidden_states[:, -1:, :]``. Shapes: LLaVA-1.5-7B's head (32064 x 4096), batch 32, 32 positions.

    python scripts/repro_strided_linear.py            # full shapes (the bf16 frozen strided case is slow)
    python scripts/repro_strided_linear.py --quick    # smaller shapes, seconds

Prints one JSON object: milliseconds per call for each (dtype, requires_grad, layout), one call after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="vocab 4096 x hidden 1024, batch 8")
    args = parser.parse_args()
    vocab, hidden, batch, seq = (4096, 1024, 8, 8) if args.quick else (32064, 4096, 32, 32)
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.randn(vocab, hidden, dtype=dtype) * 0.02
        hidden_states = torch.randn(batch, seq, hidden, dtype=dtype)
        for requires_grad in (True, False):
            w = torch.nn.Parameter(weight.clone(), requires_grad=requires_grad)
            for layout, x in (("strided", hidden_states[:, -1:, :]),
                              ("contiguous", hidden_states[:, -1:, :].contiguous())):
                F.linear(x, w)
                start = time.perf_counter()
                F.linear(x, w)
                ms = (time.perf_counter() - start) * 1e3
                rows.append({"dtype": str(dtype).removeprefix("torch."), "requires_grad": requires_grad,
                             "input": layout, "ms": round(ms, 2)})
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "shapes": {"input": [batch, seq, hidden], "weight": [vocab, hidden]}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
