#!/usr/bin/env python
"""Host memory of ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload on 2 CPU ranks, and the model-states split at
LLaVA-1.5-7B/13B size on 8 GPUs.

    python scripts/bench_memory.py            # a ~340M-parameter LLaVA-architecture model, hidden 4096, 2 layers
    python scripts/bench_memory.py --quick    # a tiny model: checks the script runs (seconds per stage)

Each configuration is a real `deepspeed --num_gpus 2 scripts/train.py` run of configs/demo.yaml (2 steps, fp32,
DS_ACCELERATOR=cpu) on a random model with 7B-like widths; rank 0 reports its peak RSS right after loading the
base and at the end (summary.json). ZeRO-3 loads the base inside zero.Init, so each rank should hold about half.
The estimate part counts model states per GPU for RoAd4 (frozen bf16 base; fp32 master, Adam moments and bf16
copy of the trainable parameters), next to DeepSpeed's own estimator for a *full* finetune of the same sizes, and
one GPU's model states + activations for a bf16, int8 and NF4 base at batch 16 x 2048 with gradient checkpointing.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("zero2", "zero3", "zero3_offload")
GIB = 2 ** 30

# LLaVA-1.5 sizes: total parameters (CLIP ViT-L/14-336 + projector + Vicuna), largest layer (the embedding),
# and RoAd4 + projector trainable parameters (docs/adapters.md's counts; 13B: 4 x 53,248 x 40 + projector 5120-wide).
SIZES = {
    "llava-1.5-7b": {"total": 7_063_427_072, "largest_layer": 32_064 * 4096, "trainable": 5_439_488 + 20_979_712},
    "llava-1.5-13b": {"total": 13_350_839_296, "largest_layer": 32_064 * 5120, "trainable": 8_519_680 + 31_467_520},
}
# The language model's shape (Vicuna-7B/13B): what a quantized base quantizes (its linears) and what activations
# scale with.
SHAPES = {
    "llava-1.5-7b": {"layers": 32, "hidden": 4096, "intermediate": 11008, "vocab": 32_064},
    "llava-1.5-13b": {"layers": 40, "hidden": 5120, "intermediate": 13824, "vocab": 32_064},
}
# Bytes per quantized weight: int8 (+ one fp32 scale per row, negligible); NF4 with double quantization: 4 bits +
# one 8-bit block scale per 64 weights + one fp32 per 256 blocks (QLoRA's 0.127 bit overhead).
BASE_BYTES = {"bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}


def _run(model: Path, data: Path, out: Path, zero: str) -> dict:
    from road_vlm.train.commands import launcher_command

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = launcher_command("configs/demo.yaml", [
        f"model.name_or_path={model}", f"data.path={data}", f"output.dir={out}", "output.report_to=none",
        f"deepspeed.config=configs/deepspeed/{zero}.json", "train.max_steps=2", "train.per_device_batch_size=1",
        "train.verify_final_adapter=false", "train.gradient_checkpointing=false"], num_processes=2)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    summary = json.loads((out / "summary.json").read_text())
    load = summary["base_load"]
    return {
        "rank0_peak_rss_after_load_gib": round(load["host_peak_rss_bytes"] / GIB, 3),
        "rank0_peak_rss_gib": round(summary["peak_memory"]["host_peak_rss_bytes"] / GIB, 3),
        "base_partitioned_at_load": load["zero3_partitioned"],
        "rank0_base_elements": load["local_elements"] if load["zero3_partitioned"] else None,
        "base_elements": load["total_elements"] if load["zero3_partitioned"] else None,
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
    }


def estimate(total: int, trainable: int, largest_layer: int, gpus: int = 8) -> dict:
    """Model states per GPU (GiB) for adapter training with a frozen bf16 base."""
    frozen = total - trainable
    states = 16 * trainable  # fp32 master (4) + Adam m, v (8) + bf16 parameter (2) + bf16 gradient (2)
    zero2 = 2 * frozen + 2 * trainable + (states - 2 * trainable) / gpus
    zero3 = (2 * frozen + states) / gpus
    zero3_offload = 2 * frozen / gpus + 4 * trainable / gpus  # optimizer states and master weights on the host
    out = {"zero2_gib": round(zero2 / GIB, 2), "zero3_gib": round(zero3 / GIB, 2),
           "zero3_offload_gib": round(zero3_offload / GIB, 2),
           "zero3_gathered_layer_gib": round(2 * largest_layer / GIB, 2)}
    try:  # DeepSpeed's estimator assumes every parameter trains: the full-finetune comparison
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _cpu_bytes, gpu_bytes, _layer = estimate_zero3_model_states_mem_needs(
            total, largest_layer, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False)
        out["deepspeed_full_finetune_zero3_gib"] = round(gpu_bytes / GIB, 2)
    except Exception as err:  # noqa: BLE001 - an estimator API change must not hide the measurements
        out["deepspeed_full_finetune_zero3_gib"] = f"unavailable: {type(err).__name__}"
    return out


def single_gpu_estimate(name: str, base: str, *, micro_batch: int, seq: int = 2048, budget_gib: float = 24.0) -> dict:
    """One GPU, RoAd4 + projector, gradient checkpointing, bf16 compute: model states + activations (GiB).

    Quantized: the language model's linears (``road_vlm.quantization``); the vision tower, projector, embeddings
    and lm_head stay bf16. Activations: the checkpointed input of every decoder layer (``residual_bytes`` each:
    4 with the k-bit preparation's fp32 norms, which make the residual stream fp32, 2 without), one layer's
    recomputed MLP (3 bf16 [tokens, intermediate] tensors) and the logits (bf16 + the fp32 copy of the loss).
    """
    size, shape = SIZES[name], SHAPES[name]
    linears = shape["layers"] * (4 * shape["hidden"] ** 2 + 3 * shape["hidden"] * shape["intermediate"])
    frozen = BASE_BYTES[base] * linears + 2 * (size["total"] - linears - size["trainable"])
    states = frozen + 16 * size["trainable"]
    residual_bytes = 2 if base == "bf16" else 4
    tokens = micro_batch * seq

    def activations(tokens: int) -> float:
        return tokens * (shape["layers"] * shape["hidden"] * residual_bytes + 3 * 2 * shape["intermediate"]
                         + 6 * shape["vocab"])

    fits = [b for b in (16, 8, 4, 2, 1) if states + activations(b * seq) <= budget_gib * GIB]
    return {"model_states_gib": round(states / GIB, 2), "activations_gib": round(activations(tokens) / GIB, 2),
            "total_gib": round((states + activations(tokens)) / GIB, 2),
            f"largest_micro_batch_within_{budget_gib:g}_gib": fits[0] if fits else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, to check the script runs")
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    args = parser.parse_args()
    hidden, layers = (64, 2) if args.quick else (args.hidden_size, args.num_layers)

    from road_vlm.demo.synthetic import generate_training_data, tokenizer_corpus
    from road_vlm.demo.tiny_base import build_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="road_vlm_bench_memory_"))
    model = build_tiny_llava(work / "model", corpus=tokenizer_corpus(), hidden_size=hidden, num_layers=layers)
    data = generate_training_data(work / "data", num_samples=16, num_pretrain=0) / "instruct.json"
    runs = {zero: _run(model, data, work / zero, zero) for zero in args.configs}
    report = {"model": {"hidden_size": hidden, "num_layers": layers}, "runs": runs}
    if "zero2" in runs and "zero3" in runs and "error" not in runs["zero2"] and "error" not in runs["zero3"]:
        report["zero3_over_zero2_peak_rss"] = round(runs["zero3"]["rank0_peak_rss_gib"]
                                                    / runs["zero2"]["rank0_peak_rss_gib"], 3)
        report["zero3_over_zero2_rss_after_load"] = round(runs["zero3"]["rank0_peak_rss_after_load_gib"]
                                                          / runs["zero2"]["rank0_peak_rss_after_load_gib"], 3)
    report["estimate_8_gpus_road4"] = {name: estimate(**size) for name, size in SIZES.items()}
    report["estimate_1_gpu_road4_batch16x2048_gc"] = {
        name: {base: single_gpu_estimate(name, base, micro_batch=16) for base in BASE_BYTES} for name in SIZES}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
