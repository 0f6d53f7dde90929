"""Heterogeneous-batch throughput: road_vlm RoAd4 vs PEFT RoAd4 vs PEFT LoRA r=16 vs the bare base model.

For each system and each N in --adapters (default 1 4 16 32), N distinct adapters are loaded and a batch of
--batch-size rows (row i uses adapter i mod N) generates --new-tokens tokens per row with one greedy
``generate()`` call (EOS suppressed, so every row really generates that many). Reported: generated tokens per
second (median of --repeats timed runs after one warm-up run), and ratios against PEFT LoRA and the base.

  python scripts/bench_serving.py                  # tiny LLaVA on CPU
  python scripts/bench_serving.py --preset 7b      # LLaVA-1.5-7B shapes, random weights, bf16 on a GPU
  python scripts/bench_serving.py --profile        # + where road_vlm's time above the base goes, per operator

Paper target (RoAd, NeurIPS 2024): heterogeneous-batch throughput at least 2x LoRA's and within 10% of the base.
Prompts are text-only: adapters act on the language model, and image tokens would only add the same prefill
work to every system.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import llava15_7b_config, randomize_

LM_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def build_base(preset: str, device: str, dtype: torch.dtype, workdir: Path, num_layers: int | None = None) -> Any:
    """The base LlavaForConditionalGeneration: the tiny test model, or LLaVA-1.5-7B shapes with random weights."""
    from transformers import LlavaForConditionalGeneration

    if preset == "tiny":
        from road_vlm.model import load_base
        from road_vlm.demo.tiny_base import build_tiny_llava

        model, _ = load_base(build_tiny_llava(workdir / "tiny"), device=device, dtype=dtype)
        return model
    config = llava15_7b_config(num_layers)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise directly on the GPU: random 7B init on CPU takes minutes
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    from road_vlm.model import contiguous_lm_head_input

    return contiguous_lm_head_input(model.eval())  # as road_vlm's loader builds every model


def _inputs(batch: int, prompt_len: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 30000) - 1, (batch, prompt_len), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _timed_once(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _generate_kwargs(args: argparse.Namespace, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {**inputs, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
            "pad_token_id": 0, "temperature": None, "top_p": None, "top_k": None}


def road_vlm_system(model: Any, args: argparse.Namespace) -> Callable[[list[str], dict[str, Any]], None]:
    """road_vlm's one-pass mixed batch: max(N) RoAd4 adapters, per_sample_adapters picks one per row."""
    from road_vlm.adapters import AdapterConfig, adapted_layers, add_adapter, per_sample_adapters

    for i in range(max(args.adapters)):
        name = f"a{i}"
        add_adapter(model, AdapterConfig(variant="road4", group_size=args.group_size), name)
        randomize_([p for layer in adapted_layers(model).values() for p in layer.adapter_parameters(name).values()],
                   seed=i)
    model.eval()

    def run(names: list[str], kwargs: dict[str, Any]) -> None:
        with per_sample_adapters(model, names):
            model.generate(**kwargs)

    run.model = model  # type: ignore[attr-defined]  # for the --profile ablation
    return run


def peft_system(model: Any, kind: str, args: argparse.Namespace) -> Callable[[list[str], dict[str, Any]], None]:
    """PEFT's mixed batch: ``generate(adapter_names=[...])`` over max(N) RoAd4 or LoRA r=16 adapters."""
    from peft import LoraConfig, RoadConfig, get_peft_model

    def config() -> Any:
        if kind == "road4":
            return RoadConfig(variant="road_4", group_size=args.group_size, target_modules=LM_TARGETS)
        return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LM_TARGETS, init_lora_weights=False)

    # Adapter weights in the model's dtype (bf16 on the 7b preset), as road_vlm's mixed-batch tables are: PEFT's
    # default fp32 upcast is slower, and its RoAd mixed-batch path fails with it on a bf16 base (peft 0.21.2:
    # "Index put requires the source and destination dtypes match").
    peft_model = get_peft_model(model, config(), adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, max(args.adapters)):
        peft_model.add_adapter(f"a{i}", config(), autocast_adapter_dtype=False)
    if kind == "road4":
        randomize_([p for name, p in peft_model.named_parameters() if "road_" in name], seed=0)
    peft_model.eval()

    def run(names: list[str], kwargs: dict[str, Any]) -> None:
        peft_model.generate(**kwargs, adapter_names=names)

    return run


def overhead_breakdown(systems: dict[str, Callable[[list[str], dict[str, Any]], None]], names: list[str],
                       kwargs: dict[str, Any], device: str, top: int = 12) -> dict[str, Any]:
    """Where road_vlm's time above the base goes: one profiled ``generate`` of each, the time per operator
    (self time: CPU, or the accelerator's on CUDA) compared, and the rest (Python, dispatch: wall time not inside
    any operator). The profiler slows both alike; read the differences, not the totals."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    per_op: dict[str, dict[str, float]] = {}
    wall: dict[str, float] = {}
    for name in ("base", "road_vlm_road4"):
        systems[name](names, kwargs)  # warm
        with profile(activities=activities) as prof:
            wall[name] = _timed_once(lambda: systems[name](names, kwargs), device) * 1e3
        per_op[name] = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
                        for e in prof.key_averages()}
    hotspots = {name: _python_hotspots(lambda: systems[name](names, kwargs)) for name in ("base", "road_vlm_road4")}
    ablation = _ablation(systems, names, kwargs, device)
    ops = set(per_op["base"]) | set(per_op["road_vlm_road4"])
    extra = {op: per_op["road_vlm_road4"].get(op, 0.0) - per_op["base"].get(op, 0.0) for op in ops}
    in_ops = {name: sum(values.values()) for name, values in per_op.items()}
    return {
        "what": "one profiled generate() per system at the largest adapter count; ms",
        "wall_ms": {k: round(v, 1) for k, v in wall.items()},
        "in_operators_ms": {k: round(v, 1) for k, v in in_ops.items()},
        "outside_operators_ms": {k: round(wall[k] - in_ops[k], 1) for k in wall} if not cuda else None,
        "extra_wall_ms": round(wall["road_vlm_road4"] - wall["base"], 1),
        "extra_by_operator_ms": {op: round(v, 2) for op, v in sorted(extra.items(), key=lambda kv: -abs(kv[1]))[:top]},
        "python_self_ms_top": hotspots,
        "ablation_ms": ablation,
    }


def _ablation(systems: dict[str, Callable[[list[str], dict[str, Any]], None]], names: list[str],
              kwargs: dict[str, Any], device: str) -> dict[str, float]:
    """road_vlm's extra time per ``generate`` split by switching its parts off one at a time (no profiler, so
    the small per-call costs that the profiler's own overhead hides are measured as they are): the rotation's
    element-wise ops, the per-call table lookups, the wrapper module call, and building the tables when the
    ``per_sample_adapters`` block is entered. Medians of interleaved rounds; differences of noisy totals, so
    read them to about a millisecond."""
    from road_vlm.adapters import layer as adapter_layer
    from road_vlm.adapters import per_sample_adapters

    road = systems["road_vlm_road4"]
    model = road.model  # type: ignore[attr-defined]
    real_forward, real_rotate = adapter_layer.AdaptedLinear.forward, adapter_layer.apply_rotation_fused_

    def no_rotation(names: list[str], kw: dict[str, Any]) -> None:
        adapter_layer.apply_rotation_fused_ = lambda y, c1, s2, group_size: y
        try:
            road(names, kw)
        finally:
            adapter_layer.apply_rotation_fused_ = real_rotate

    def wrapper_only(names: list[str], kw: dict[str, Any]) -> None:
        adapter_layer.AdaptedLinear.forward = lambda self, x: self.base_layer(x)
        try:
            road(names, kw)
        finally:
            adapter_layer.AdaptedLinear.forward = real_forward

    def tables_only(names: list[str], kw: dict[str, Any]) -> None:
        with per_sample_adapters(model, names):
            pass

    rounds = 3 if device.startswith("cuda") else 5  # the GPU check's serving stage has a time budget
    variants = {"road_vlm": road, "no_rotation": no_rotation, "wrapper_only": wrapper_only, "base": systems["base"],
                "tables": tables_only}
    ms: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            ms[k].append(_timed_once(lambda: fn(names, kwargs), device) * 1e3)
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {
        "road_vlm_generate": round(med["road_vlm"], 1),
        "base_generate": round(med["base"], 1),
        "rotation_ops": round(med["road_vlm"] - med["no_rotation"], 1),
        "table_lookups_per_call": round(med["no_rotation"] - med["wrapper_only"], 1),
        "wrapper_module_calls": round(med["wrapper_only"] - med["base"] - med["tables"], 1),
        "building_tables_per_block": round(med["tables"], 1),
    }


def _python_hotspots(fn: Callable[[], Any], top: int = 10) -> dict[str, float]:
    """cProfile's self time per Python function (ms) of one call, largest first: where the time outside
    operators goes."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(fn)
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive, self s, cumulative s, ...)
    rows = sorted(((f"{Path(file).name}:{func}", v[2] * 1e3) for (file, _, func), v in stats.items()),
                  key=lambda kv: -kv[1])[:top]
    return {name: round(ms, 2) for name, ms in rows}


def measure(args: argparse.Namespace, dtype: torch.dtype) -> tuple[dict[str, dict[str, list[float]]], Any]:
    """Seconds per ``generate`` of every system, by adapter count; and the profile breakdown (``--profile``)."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)

        def fresh() -> Any:
            return build_base(args.preset, args.device, dtype, workdir, args.num_layers)

        base_model = fresh()
        vocab = base_model.config.text_config.vocab_size
        kwargs = _generate_kwargs(args, _inputs(args.batch_size, args.prompt_len, vocab, args.device))
        systems: dict[str, Callable[[list[str], dict[str, Any]], None]] = {
            "base": lambda names, kw: base_model.generate(**kw)}
        if "road_vlm_road4" in args.systems:
            systems["road_vlm_road4"] = road_vlm_system(fresh(), args)
        if "peft_road4" in args.systems:
            systems["peft_road4"] = peft_system(fresh(), "road4", args)
        if "peft_lora16" in args.systems:
            systems["peft_lora16"] = peft_system(fresh(), "lora16", args)

        # Interleave the systems within every repeat (rotating their order), so that load from other processes
        # on a shared machine hits all of them alike; the first round is a discarded warm-up.
        timings: dict[str, dict[str, list[float]]] = {name: {} for name in systems}
        order = list(systems)
        with torch.inference_mode():
            for n in args.adapters:
                names = [f"a{i % n}" for i in range(args.batch_size)]
                for rep in range(args.repeats + 1):
                    for name in order[rep % len(order):] + order[: rep % len(order)]:
                        seconds = _timed_once(lambda: systems[name](names, kwargs), args.device)
                        if rep:
                            timings[name].setdefault(str(n), []).append(seconds)
                line = ", ".join(f"{k} {args.batch_size * args.new_tokens / statistics.median(v[str(n)]):.1f}"
                                 for k, v in timings.items())
                print(f"  {n:>2} adapters: {line} tok/s", file=sys.stderr, flush=True)
            breakdown = None
            if args.profile and "road_vlm_road4" in systems:
                n = max(args.adapters)
                breakdown = overhead_breakdown(systems, [f"a{i % n}" for i in range(args.batch_size)], kwargs,
                                               args.device)
    return timings, breakdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--device", default=None, help="default: cpu for tiny, cuda for 7b")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 32 (tiny), 128 (7b)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 32 (tiny), 64 (7b)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=None, help="RoAd group size (default: 8 tiny, 64 7b)")
    parser.add_argument("--systems", nargs="+", default=["road_vlm_road4", "peft_road4", "peft_lora16"],
                        choices=["road_vlm_road4", "peft_road4", "peft_lora16"])
    parser.add_argument("--num-layers", type=int, default=None,
                        help="7b preset: fewer decoder layers (same layer shapes), for a quick check")
    parser.add_argument("--output", default=None, help="also write the JSON report to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 for tiny on CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile road_vlm against the base once and report where the extra time goes")
    args = parser.parse_args(argv)
    tiny = args.preset == "tiny"
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by PEFT) otherwise logs to stdout
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.prompt_len = args.prompt_len or (32 if tiny else 128)
    args.new_tokens = args.new_tokens or (32 if tiny else 64)
    args.group_size = args.group_size or (8 if tiny else 64)
    if max(args.adapters) > args.batch_size:
        parser.error("--batch-size must be at least the largest --adapters value (one row per adapter at least)")
    if args.threads or (tiny and args.device == "cpu"):
        # The tiny model's matmuls gain nothing from threads; one thread is steadier on a shared machine.
        torch.set_num_threads(args.threads or 1)
    dtype = torch.float32 if tiny else torch.bfloat16
    timings, breakdown = measure(args, dtype)
    gc.collect()  # the systems' models are gone with measure's frame

    tokens = args.batch_size * args.new_tokens
    results = {name: {n: tokens / statistics.median(t) for n, t in per_n.items()} for name, per_n in timings.items()}
    base_per_n = results.pop("base")
    base = statistics.median(base_per_n.values())
    ratios: dict[str, Any] = {}
    if "road_vlm_road4" in results:
        ours = results["road_vlm_road4"]
        ratios["road_vlm_road4_vs_base"] = {n: round(v / base_per_n[n], 3) for n, v in ours.items()}
        for other in ("peft_lora16", "peft_road4"):
            if other in results:
                ratios[f"road_vlm_road4_vs_{other}"] = {n: round(v / results[other][n], 3) for n, v in ours.items()}
    report = {
        "preset": args.preset,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "group_size": args.group_size,
        "num_layers": args.num_layers,
        "metric": "generated tokens/s (median of repeats, systems interleaved), row i uses adapter i mod N",
        "base_tokens_per_s": round(base, 2),
        "base_tokens_per_s_by_round": {n: round(v, 2) for n, v in base_per_n.items()},
        "tokens_per_s": {k: {n: round(v, 2) for n, v in r.items()} for k, r in results.items()},
        "ratios": ratios,
        "targets": {"vs_lora": ">= 2.0", "vs_base": ">= 0.9"},
    }
    if breakdown is not None:
        report["overhead_breakdown"] = breakdown
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
