#!/usr/bin/env python
"""How much do answers depend on the inference dtype and the batch size? Greedy answers of one model on the
synthetic benchmarks (LLaVA-1.5's eval layout) in fp32 / bf16 / fp16 at batch 1 and 8, compared with fp32 at
batch 1: the share of identical answers and the benchmark scores.

    python scripts/bench_numerics.py                       # the tiny random model, CPU (about a minute)
    python scripts/bench_numerics.py --model DIR --adapter CKPT --device cuda --num-per-benchmark 200

Prints one JSON object. LLaVA runs its evaluations in fp16 with batch 1 (``model_vqa_loader.py``); road_vlm's
default is bf16 on CUDA with left-padded batches.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

BENCHMARKS = "gqa,textvqa,pope,scienceqa"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF LLaVA directory (default: build the tiny model)")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-per-benchmark", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    import torch

    from road_vlm.demo.synthetic import generate_eval_data, tokenizer_corpus
    from road_vlm.eval import evaluate
    from road_vlm.eval.predictions import read_predictions
    from road_vlm.filenames import PREDICTIONS

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="road_vlm_numerics_"))
    model = args.model
    if model is None:
        from road_vlm.demo.tiny_base import build_tiny_llava

        model = build_tiny_llava(work / "tiny", corpus=tokenizer_corpus())
    data = generate_eval_data(work / "data", num_per_benchmark=args.num_per_benchmark)
    runs = {}
    for dtype in args.dtypes:
        for batch in args.batch_sizes:
            name = f"{dtype}-b{batch}"
            out = work / name
            results = evaluate(model, [args.adapter] if args.adapter else None, BENCHMARKS, data, out, batch,
                               device=args.device, dtype=dtype, max_new_tokens=args.max_new_tokens, progress=False)
            row = next(iter(results["rows"]))
            answers = {b: [r["text"] for r in read_predictions(out / row / b / PREDICTIONS)]
                       for b in BENCHMARKS.split(",")}
            runs[name] = {"scores": results["rows"][row], "answers": answers}
    reference = runs[f"{args.dtypes[0]}-b{args.batch_sizes[0]}"]["answers"]
    report = {"model": str(model), "adapter": args.adapter, "device": args.device,
              "max_new_tokens": args.max_new_tokens, "reference": f"{args.dtypes[0]}-b{args.batch_sizes[0]}",
              "runs": {}}
    def identical(a: dict, b: dict) -> str:
        same = sum(x == y for bench in b for x, y in zip(a[bench], b[bench]))
        return f"{same}/{sum(len(v) for v in b.values())}"

    for name, run in runs.items():
        dtype = name.rsplit("-b", 1)[0]
        report["runs"][name] = {
            "identical_to_reference": identical(run["answers"], reference),
            f"identical_to_{dtype}_batch_{args.batch_sizes[0]}": identical(
                run["answers"], runs[f"{dtype}-b{args.batch_sizes[0]}"]["answers"]),
            "scores": run["scores"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
