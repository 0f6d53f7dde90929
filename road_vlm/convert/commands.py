"""``road-vlm build-base`` and ``road-vlm convert-llava``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="the HF LLaVA directory to write")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="weights dtype of the output (llava-hf: float16)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the new <image>/<pad> embedding rows (and an initialised projector)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")


def _build_base(args: argparse.Namespace) -> int:
    from road_vlm.convert import ConversionError, build_base

    try:
        out = build_base(args.vision_tower, args.language_model, args.output, projector=args.projector,
                         dtype=args.dtype, seed=args.seed, overwrite=args.overwrite)
    except (ConversionError, FileNotFoundError) as err:
        print(f"road-vlm build-base: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from road_vlm.convert import ConversionError, convert_llava

    try:
        out = convert_llava(args.checkpoint, args.vision_tower, args.output, dtype=args.dtype, seed=args.seed,
                            overwrite=args.overwrite)
    except (ConversionError, FileNotFoundError) as err:
        print(f"road-vlm convert-llava: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


def register(subparsers: Any) -> None:
    """Add ``build-base`` and ``convert-llava`` to the ``road-vlm`` command."""
    parser = subparsers.add_parser(
        "build-base", help="assemble LLaVA-1.5 from CLIP + Vicuna (+ a stage-1 mm_projector.bin)",
        description="LLaVA's stage-2 starting point as one HF LlavaForConditionalGeneration directory: a CLIP "
        "vision tower (openai/clip-vit-large-patch14-336 layout), a Llama/Vicuna language model (HF layout) and "
        "optionally LLaVA's stage-1 projector file (mm_projector.bin or .safetensors; without it the projector "
        "is initialised for stage-1 training). <image> and <pad> are added and the vocabulary resized as in "
        "llava-hf.")
    parser.add_argument("--vision-tower", required=True, help="CLIP directory (HF layout)")
    parser.add_argument("--language-model", required=True, help="Llama/Vicuna directory (HF layout)")
    parser.add_argument("--projector", default=None, help="LLaVA stage-1 mm_projector.bin (or .safetensors)")
    _common(parser)
    parser.set_defaults(func=_build_base)

    parser = subparsers.add_parser(
        "convert-llava", help="convert an original LLaVA-1.5 checkpoint (liuhaotian/llava-v1.5-*) to HF layout",
        description="An original LLaVA-1.5 checkpoint directory (LlavaLlamaForCausalLM weights with "
        "model.mm_projector.*, its tokenizer and mm_* config) -> HF LlavaForConditionalGeneration, so its "
        "models and community finetunes can be evaluated, adapted and served.")
    parser.add_argument("checkpoint", help="the original LLaVA checkpoint directory")
    parser.add_argument("--vision-tower", required=True,
                        help="CLIP directory named by the checkpoint's mm_vision_tower (HF layout)")
    _common(parser)
    parser.set_defaults(func=_convert)
