#!/usr/bin/env python
"""Per-layer cost of mixed-adapter batches and of merging: road_vlm vs PEFT.

For each layer shape (d_in x d_out) and each batch shape (decode: batch 32 x 1 token; prefill: batch 16 x 256
tokens) and 1 / 4 / 32 distinct adapters in the batch, times one forward of:

- ``base``: the bare ``nn.Linear``;
- ``road_vlm_road4``: road_vlm's AdaptedLinear in mixed-batch mode (gathered c1/s2 tables + one element-wise pass);
- ``peft_road4``: PEFT's RoAd layer with ``adapter_names=`` (Python loop over the distinct adapters);
- ``peft_lora_r16``: PEFT's LoRA layer with ``adapter_names=``.

and the time to merge one RoAd4 adapter into the layer: road_vlm (row-wise, O(d_out d_in)) vs PEFT (dense R @ W).
Prints one JSON document. ``*_ms`` are end-to-end per-call times; ``*_adapter_ms`` is the time each layer spends on
top of its matmul (measured with the matmul replaced by replaying its output, see ``_isolated_adapter_cost``)
and ``*_overhead_pct`` = adapter time / base time. Forward timing: the candidates of one configuration
are timed in interleaved rounds and the minimum per-call time is kept (robust on a shared, loaded machine);
CUDA is synchronised around every timing. Merges: median wall time of ``--merge-repeats`` runs.

``--cuda-graphs`` (CUDA only) times each candidate as the replay of a CUDA graph captured from one call, which is
how a graph-captured decode step runs it: launch and Python dispatch costs vanish and what remains is the kernels'
own time. A candidate that cannot be captured (a host sync inside its forward) gets its error in the row instead.

Example: ``python scripts/bench_adapters.py --device cpu --dtype float32``;
quick: ``python scripts/bench_adapters.py --quick``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from road_vlm.adapters import AdapterConfig
from road_vlm.adapters.layer import AdaptedLinear


class _Holder(nn.Module):
    """The smallest model PEFT can wrap: one Linear called ``proj``."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.proj = layer


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_time: float, device) -> dict[str, float]:
    """Per-call seconds of each fn: the minimum over ``rounds`` interleaved rounds.

    Interleaving (base, a, b, c, base, a, ...) exposes every candidate to the same background load, and the
    minimum is the least-disturbed estimate: other processes on a shared machine can only add time.
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    numbers = {}
    for name, fn in fns.items():  # warm up and pick a call count so one timing lasts about min_time
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        numbers[name] = max(1, int(min_time / max(time.perf_counter() - start, 1e-6)))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / numbers[name])
    return best


def _graph_replays(fns: dict[str, Callable[[], object]]) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """Each fn captured once in a CUDA graph, replaced by that graph's replay; the errors of those that cannot be."""
    replays, errors = {}, {}
    for name, fn in fns.items():
        side = torch.cuda.Stream()  # warm-up on a side stream before capture, as torch.cuda.graph requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except Exception as err:  # noqa: BLE001 - recorded in the row: which candidate a graph cannot hold, and why
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            torch.cuda.synchronize()
            continue
        replays[name] = graph.replay
    return replays, errors


def _timed(fns: dict[str, Callable[[], object]], rounds: int, min_time: float, device, graphs: bool):
    """``_interleaved`` on the calls themselves, or on their CUDA-graph replays (NaN where capture failed)."""
    if not graphs:
        return _interleaved(fns, rounds, min_time, device), {}
    replays, errors = _graph_replays(fns)
    times = _interleaved(replays, rounds, min_time, device)
    return {name: times.get(name, float("nan")) for name in fns}, errors


class _Replay(nn.Module):
    """Stands in for the base Linear: returns a fresh copy of a precomputed output (adapters update in place)."""

    def __init__(self, y: torch.Tensor) -> None:
        super().__init__()
        self.y = y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.y.clone()


def _isolated_adapter_cost(layers: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, names, args, device):
    """Seconds each layer spends on top of its base matmul, measured with the matmul replaced by a replay.

    Structurally every candidate computes base(x) and then its adapter work, so this difference *is* the
    overhead; it is measured on short calls (microseconds to milliseconds), which background load on a shared
    machine disturbs far less than the end-to-end comparison of two long matmul-bound calls.
    """
    replay = _Replay(y)
    saved = {k: layer.base_layer for k, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.base_layer = replay
        fns = {"replay": lambda: replay(x)}
        for key, layer in layers.items():
            fns[key] = (lambda layer=layer: layer(x)) if key == "road_vlm_road4" else (
                lambda layer=layer: layer(x, adapter_names=names))
        t, _ = _timed(fns, args.rounds, args.min_run_time / 4, device, args.cuda_graphs)
    finally:
        for k, layer in layers.items():
            layer.base_layer = saved[k]
    return {k: float("nan") if math.isnan(t[k]) else max(t[k] - t["replay"], 0.0) for k in layers}


def _randomize(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "road_alpha" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "road_theta" in name or "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _road_vlm_layer(base: nn.Linear, n_adapters: int, group_size: int) -> AdaptedLinear:
    layer = AdaptedLinear(copy.deepcopy(base), "bench.proj").eval()
    cfg = AdapterConfig(variant="road4", group_size=group_size, target_modules=["proj"])
    for i in range(n_adapters):
        layer.add(f"a{i}", cfg)
    _randomize(layer, seed=1)
    return layer


def _peft_layer(base: nn.Linear, kind: str, n_adapters: int, group_size: int, lora_r: int) -> nn.Module:
    from peft import LoraConfig, RoadConfig, get_peft_model

    def config():
        if kind == "road4":
            return RoadConfig(variant="road_4", group_size=group_size, target_modules=["proj"], init_weights=False)
        return LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=["proj"], init_lora_weights=False)

    model = get_peft_model(_Holder(copy.deepcopy(base)), config(), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", config())
    # Adapter weights in the layer's dtype, as road_vlm's tables are. PEFT keeps them in fp32 on a bf16 layer by
    # default, and its mixed-batch RoAd forward then fails ("Index put requires the source and destination dtypes
    # match", peft 0.21).
    model.to(dtype=base.weight.dtype)
    model.eval()
    _randomize(model, seed=1)
    return model.base_model.model.proj


def bench_forward(args, d_in: int, d_out: int, device, dtype) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(device=device, dtype=dtype).eval()
    shapes = {"decode": (args.decode_batch, 1), "prefill": (args.prefill_batch, args.prefill_tokens)}
    max_n = max(args.adapters)
    road_layer = _road_vlm_layer(base, max_n, args.group_size)
    peft_road = _peft_layer(base, "road4", max_n, args.group_size, args.lora_r)
    peft_lora = _peft_layer(base, "lora", max_n, args.group_size, args.lora_r)
    for shape_name, (batch, tokens) in shapes.items():
        x = torch.randn(batch, tokens, d_in, device=device, dtype=dtype)
        with torch.no_grad():
            for n in args.adapters:
                names = [f"a{i % n}" for i in range(batch)]
                road_layer.build_mixed_tables(names, dtype=dtype)
                # Correctness guard: the timed implementations must agree before their times mean anything.
                ours = road_layer(x)
                ref = peft_road(x, adapter_names=names)
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                if not torch.allclose(ours.float(), ref.float(), atol=tol * float(ref.abs().max()), rtol=0):
                    raise RuntimeError(f"road_vlm and PEFT RoAd4 disagree for {d_in}x{d_out} {shape_name} n={n}")
                timings, capture_errors = _timed(
                    {
                        "base": lambda: base(x),
                        "road_vlm_road4": lambda: road_layer(x),
                        "peft_road4": lambda: peft_road(x, adapter_names=names),
                        "peft_lora_r16": lambda: peft_lora(x, adapter_names=names),
                    },
                    args.rounds, args.min_run_time, device, args.cuda_graphs,
                )
                t_base = timings["base"]
                extra = _isolated_adapter_cost(
                    {"road_vlm_road4": road_layer, "peft_road4": peft_road, "peft_lora_r16": peft_lora},
                    x, base(x), names, args, device,
                )
                row = {
                    "layer": f"{d_in}x{d_out}",
                    "shape": f"{shape_name} (batch {batch} x {tokens} tok)",
                    "distinct_adapters": n,
                    "cuda_graphs": args.cuda_graphs,
                    **{f"{k}_ms": _ms(v) for k, v in timings.items()},
                }
                for k, v in extra.items():
                    row[f"{k}_adapter_ms"] = _ms(v)
                    row[f"{k}_overhead_pct"] = None if math.isnan(v) else round(100.0 * v / t_base, 2)
                if capture_errors:
                    row["not_capturable"] = capture_errors
                rows.append(row)
                if args.progress:
                    print(json.dumps(row), flush=True)
                road_layer.clear_mixed_tables()
    return rows


def _ms(seconds: float) -> float | None:
    """Milliseconds, rounded; None (JSON null) for a candidate that has no time (NaN: not capturable)."""
    return None if math.isnan(seconds) else round(seconds * 1e3, 4)


def _median_wall(fn: Callable[[], None], undo: Callable[[], None], repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        undo()
    return statistics.median(times)


def bench_merge(args, d_in: int, d_out: int, device, dtype) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=True).to(device=device, dtype=dtype)
    road_layer = _road_vlm_layer(base, 1, args.group_size)
    peft_road = _peft_layer(base, "road4", 1, args.group_size, args.lora_r)
    w0 = base.weight.detach().clone()
    b0 = base.bias.detach().clone()

    def restore(layer, linear):
        def undo():
            with torch.no_grad():
                linear.weight.copy_(w0)
                linear.bias.copy_(b0)
            if isinstance(layer, AdaptedLinear):
                layer.merged = None
            else:
                layer.merged_adapters.clear()  # skip PEFT's dense-inverse unmerge: only merge is timed
        return undo

    t_ours = _median_wall(lambda: road_layer.merge("a0"), restore(road_layer, road_layer.base_layer),
                          args.merge_repeats, device)
    t_peft = _median_wall(lambda: peft_road.merge(adapter_names=["a0"]), restore(peft_road, peft_road.get_base_layer()),
                          args.merge_repeats, device)
    return {
        "layer": f"{d_in}x{d_out}",
        "road_vlm_merge_ms": round(t_ours * 1e3, 3),
        "peft_merge_ms": round(t_peft * 1e3, 3),
        "speedup": round(t_peft / t_ours, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--layers", default="4096x4096,4096x11008", help="comma-separated d_in x d_out")
    parser.add_argument("--adapters", default="1,4,32", help="distinct adapters per batch, comma-separated")
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--prefill-batch", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: all on cuda; 1 on cpu, which is the stable choice on a "
                             "shared machine where other processes take cores)")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per timing of one candidate")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the minimum is kept)")
    parser.add_argument("--merge-repeats", type=int, default=3)
    parser.add_argument("--no-merge", action="store_true", help="skip the merge timings")
    parser.add_argument("--no-forward", action="store_true", help="skip the forward timings")
    parser.add_argument("--progress", action="store_true", help="print each row as it is measured")
    parser.add_argument("--quick", action="store_true", help="small layers and batches: a smoke run in seconds")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time each candidate as a CUDA graph replay (CUDA only; see the module docstring)")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.prefill_tokens, args.min_run_time, args.rounds, args.merge_repeats = (
            "512x512,512x1408", 32, 0.05, 3, 2)  # d_out divisible by the group size
    args.adapters = [int(a) for a in args.adapters.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.cuda_graphs and args.device != "cuda":
        parser.error("--cuda-graphs needs --device cuda (CUDA graphs exist only on the GPU)")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads is None:
        args.threads = 1 if device.type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(args.threads)

    layers = [tuple(int(v) for v in spec.lower().split("x")) for spec in args.layers.split(",")]
    forward_rows, merge_rows = [], []
    for d_in, d_out in layers:
        if not args.no_forward:
            forward_rows += bench_forward(args, d_in, d_out, device, dtype)
        if not args.no_merge:
            merge_rows.append(bench_merge(args, d_in, d_out, device, dtype))
            if args.progress:
                print(json.dumps(merge_rows[-1]), flush=True)
    result = {
        "device": (torch.cuda.get_device_name() if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "threads": args.threads,
        "dtype": args.dtype,
        "cuda_graphs": args.cuda_graphs,
        "torch": torch.__version__,
        "forward": forward_rows,
        "merge": merge_rows,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
