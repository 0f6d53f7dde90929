#!/usr/bin/env python
"""Benchmark one optimizer step (forward + backward + AdamW) per adapter method on the same LLaVA model.

Methods: road_vlm RoAd4, road_vlm RoAd1+LoRA (r=16, the hybrid recipe), road_vlm LoRA r=128 (LLaVA's recipe),
PEFT's RoAd4 tuner, and road_vlm RoAd4 on an NF4 base (road4_nf4: the language model's linears in 4 bits, loaded
through road_vlm's loader from a saved copy of the random model; the 7b preset writes ~14 GB to a temp dir).
Each method runs in a fresh subprocess so peak memory is its own.

    python scripts/bench_train.py                       # tiny model on CPU (fp32)
    python scripts/bench_train.py --preset 7b           # LLaVA-1.5-7B shapes, random weights, bf16, needs a GPU

Prints one JSON object: per method the trainable parameter count, the median step time over --steps timed steps
(after --warmup untimed ones) and the peak memory (CUDA: max allocated; CPU: the process's peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import IMAGE_SIZE, IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS, llava15_7b_config

METHODS = ("road4", "road1_lora", "lora_r128", "peft_road4", "road4_nf4")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _build_model(preset: str, device: str, dtype, num_layers: int | None = None, quantization: str = "none"):
    """(model, image_token_id, num_image_tokens, image_size)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from road_vlm.model import load_base

    if preset == "tiny":
        from road_vlm.demo.tiny_base import build_tiny_llava

        path = build_tiny_llava(Path(tempfile.gettempdir()) / "road_vlm_bench_tiny")
        model, _ = load_base(path, device=device, dtype=dtype, quantization=quantization)
        return model, model.config.image_token_id, 16, 32
    if quantization != "none":  # bitsandbytes quantizes while loading: save the random model, load it quantized
        model, *rest = _build_model(preset, "cpu", dtype, num_layers)
        with tempfile.TemporaryDirectory(prefix="road_vlm_bench_base_") as tmp:
            model.save_pretrained(tmp)
            del model
            # load_base loads a processor too; the bench feeds ids and pixels itself, so the tiny one serves.
            from road_vlm.demo.tiny_base import build_tiny_llava
            from transformers import AutoProcessor

            tiny = build_tiny_llava(Path(tempfile.gettempdir()) / "road_vlm_bench_tiny")
            AutoProcessor.from_pretrained(tiny).save_pretrained(tmp)
            model, _ = load_base(tmp, device=device, dtype=dtype, quantization=quantization)
        model.config.use_cache = False
        return (model, *rest)
    config = llava15_7b_config(num_layers)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)  # random weights: only shapes matter for time and memory
    torch.set_default_dtype(torch.float32)
    model.config.use_cache = False
    return model, IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS, IMAGE_SIZE


def _attach(model, method: str) -> None:
    if method == "peft_road4":
        from peft import RoadConfig, get_peft_model

        regex = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(TARGETS) + ")"
        return get_peft_model(model, RoadConfig(variant="road_4", group_size=64, target_modules=regex))
    from road_vlm.adapters import AdapterConfig, add_adapter

    config = {
        "road4": AdapterConfig(variant="road4", group_size=64),
        "road1_lora": AdapterConfig(variant="road1_lora", group_size=64, lora_r=16, lora_alpha=32, lora_dropout=0.05),
        "lora_r128": AdapterConfig(variant="lora", lora_r=128, lora_alpha=256, lora_dropout=0.05),
    }[method]
    add_adapter(model, config)
    return model


def run_one(args: argparse.Namespace) -> dict:
    import torch

    device = "cuda" if args.preset == "7b" else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset 7b needs a CUDA GPU")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    quantization = "nf4" if args.method.endswith("_nf4") else "none"
    model, image_token_id, n_img, size = _build_model(args.preset, device, dtype, args.num_layers, quantization)
    model = _attach(model, args.method.removesuffix("_nf4"))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    gen = torch.Generator().manual_seed(0)
    text_len = args.seq_len - n_img
    if text_len < 2:
        raise SystemExit(f"--seq-len must exceed the {n_img} image tokens")
    vocab = min(model.config.text_config.vocab_size, image_token_id)
    ids = torch.randint(3, vocab, (args.batch_size, text_len), generator=gen)
    ids = torch.cat([ids[:, :1], torch.full((args.batch_size, n_img), image_token_id), ids[:, 1:]], dim=1)
    batch = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(args.batch_size, 3, size, size, generator=gen).to(device, dtype),
        "labels": ids.masked_fill(ids == image_token_id, -100).to(device),
    }

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = {"device_peak_allocated_bytes": int(torch.cuda.max_memory_allocated())}
    else:
        peak = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    return {
        "method": args.method,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "step_seconds_median": statistics.median(times),
        "step_seconds_min": min(times),
        "step_seconds": times,
        **peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "7b"), default="tiny")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 (tiny), 4 (7b)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sample incl. image tokens; default: 128 (tiny), 1024 (7b)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="7b preset: language-model layers (default 32; fewer keeps a short GPU check short)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # internal: one method, this process
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.preset == "tiny" else 4)
    args.seq_len = args.seq_len or (128 if args.preset == "tiny" else 1024)

    if args.method:
        print(json.dumps(run_one(args)))
        return 0
    results = []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--method", method, "--preset", args.preset, "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.num_layers:
            cmd += ["--num-layers", str(args.num_layers)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            results.append({"method": method, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import torch

    report = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if args.preset == "7b" else f"cpu ({os.cpu_count()} cores)",
        "dtype": "bfloat16" if args.preset == "7b" else "float32",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "gradient_checkpointing": args.gradient_checkpointing,
        "num_layers": args.num_layers if args.preset == "7b" else None,
        "torch_threads": args.threads or torch.get_num_threads(),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
