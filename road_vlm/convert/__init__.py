"""LLaVA-1.5 from other layouts -> HF ``LlavaForConditionalGeneration``: from its parts (CLIP + Llama/Vicuna +
stage-1 ``mm_projector.bin``) and from original LLaVA checkpoints. Key maps are data (``keys.py``); one module per
source; ``assemble.py`` writes the llava-hf layout both produce."""

from road_vlm.convert.assemble import ConversionError, assemble_llava
from road_vlm.convert.original import convert_llava
from road_vlm.convert.parts import build_base

__all__ = ["ConversionError", "assemble_llava", "build_base", "convert_llava"]
