#!/usr/bin/env python
"""What it costs a mixed-adapter batch to change its rows: entering ``per_sample_adapters`` with a new row set.

Continuous batching enters a new block whenever a request joins or leaves, so this is paid on every such change,
on top of the decode steps. Measured on a LLaVA model whose language model has LLaVA-1.5-7B's layer count (32
layers, 224 adapted linears) at a small width (the cost is per layer, nearly independent of width), with
--adapters RoAd4 adapters loaded and --in-batch of them in the batch (one row each); the row sets rotate, as
they do when requests come and go.

Reported (JSON; medians): ``enter_exit_ms`` (building and dropping the tables), and ``first_forward_extra_ms``
(a single-token forward right after entering a block, minus the same forward inside a block already used:
the per-layer row gathers done once per block).

    python scripts/bench_adapter_switch.py
    python scripts/bench_adapter_switch.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from _common import llava15_7b_narrow_config, randomize_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=512, help="hidden size (a multiple of 64)")
    parser.add_argument("--adapters", type=int, default=32, help="RoAd4 adapters loaded")
    parser.add_argument("--in-batch", type=int, default=16, help="distinct adapters in the batch (one row each)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="4 layers, 4 adapters, 2 in the batch, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_layers, args.adapters, args.in_batch, args.rounds = 4, 4, 2, 1
    if not 1 <= args.in_batch <= args.adapters:
        parser.error("--in-batch must be between 1 and --adapters")
    torch.set_num_threads(1)  # Python-bound work: one thread is steadier on a shared machine

    from road_vlm.adapters import AdapterConfig, adapted_layers, add_adapter, per_sample_adapters

    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(llava15_7b_narrow_config(args.num_layers, args.width)).eval()
    for i in range(args.adapters):
        add_adapter(model, AdapterConfig(variant="road4", group_size=64), f"a{i}")
        randomize_([p for layer in adapted_layers(model).values() for p in layer.adapter_parameters(f"a{i}").values()],
                   seed=i)
    model.eval()
    # Row sets as requests come and go: each shifts the previous one by one adapter.
    row_sets = [[f"a{(start + j) % args.adapters}" for j in range(args.in_batch)] for start in range(8)]
    token = torch.full((args.in_batch, 1), 5, dtype=torch.long)

    def forward() -> None:
        model(input_ids=token, use_cache=False)

    enter_ms, first_ms, later_ms = [], [], []
    with torch.inference_mode():
        for names in row_sets:  # warm-up: every bank and kernel built once
            with per_sample_adapters(model, names):
                forward()
        for _ in range(args.rounds):
            for names in row_sets:
                start = time.perf_counter()
                with per_sample_adapters(model, names):
                    pass
                enter_ms.append((time.perf_counter() - start) * 1e3)
                with per_sample_adapters(model, names):
                    start = time.perf_counter()
                    forward()
                    first_ms.append((time.perf_counter() - start) * 1e3)
                    start = time.perf_counter()
                    forward()
                    later_ms.append((time.perf_counter() - start) * 1e3)

    layers = len(adapted_layers(model))
    enter = statistics.median(enter_ms)
    report = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "num_layers": args.num_layers,
        "adapted_layers": layers,
        "width": args.width,
        "adapters_loaded": args.adapters,
        "adapters_in_batch": args.in_batch,
        "enter_exit_ms": round(enter, 2),
        "enter_exit_us_per_layer": round(enter * 1e3 / layers, 1),
        "first_forward_extra_ms": round(statistics.median(first_ms) - statistics.median(later_ms), 2),
        "forward_ms": round(statistics.median(later_ms), 2),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
