"""``road-vlm convert-llava``: an original LLaVA-1.5 checkpoint (``liuhaotian/llava-v1.5-7b`` / ``-13b`` layout,
``LlavaLlamaForCausalLM``) -> the HF ``LlavaForConditionalGeneration`` layout every road_vlm command loads.

The original directory holds the language model and projector (``model.mm_projector.{0,2}``), the Llama
tokenizer and a config whose ``mm_*`` fields describe the vision side; the vision tower is loaded from
``mm_vision_tower`` at run time, so it is passed here as a CLIP directory (its weights are taken from the
checkpoint instead when the checkpoint carries them, as checkpoints with an unfrozen tower do).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from road_vlm.convert.assemble import ConversionError, assemble_llava, read_checkpoint_weights
from road_vlm.convert.keys import CLIP_VISION, ORIGINAL_LLAVA, rename
from road_vlm.data.template import PromptFormat
from road_vlm.model import resolve_dtype
from road_vlm.filenames import HF_CONFIG

# The LLaVA-1.5 architecture this conversion (and HF's LlavaForConditionalGeneration) represents.
REQUIRED = {"mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}
FORBIDDEN_TRUE = ("mm_use_im_start_end", "mm_use_im_patch_token")


def _text_config(config: dict, source: Path):
    from transformers import LlamaConfig

    for key, want in REQUIRED.items():
        if config.get(key, want) != want:
            raise ConversionError(f"{source}/config.json: {key} is {config[key]!r}; LLaVA-1.5 (and HF LLaVA) use {want!r}")
    for key in FORBIDDEN_TRUE:
        if config.get(key):
            raise ConversionError(f"{source}/config.json: {key} is true; LLaVA-1.5 checkpoints have it false "
                                  "(no image start/end or patch tokens)")
    defaults = LlamaConfig().to_dict()
    return LlamaConfig(**{k: v for k, v in config.items() if k in defaults and k not in ("architectures",
                                                                                        "model_type")})


def convert_llava(
    checkpoint: str | Path,
    vision_tower: str | Path,
    output: str | Path,
    *,
    dtype: str | torch.dtype = "float16",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    source = Path(checkpoint)
    config_path = source / HF_CONFIG
    if not config_path.is_file():
        raise ConversionError(f"{source}: not a LLaVA checkpoint directory (no config.json)")
    config = json.loads(config_path.read_text())
    if "mm_hidden_size" not in config:
        raise ConversionError(f"{config_path}: no mm_* fields; this is not an original LLaVA checkpoint "
                              "(an llava-hf directory needs no conversion)")
    torch_dtype = resolve_dtype(dtype, "cpu")
    text_config = _text_config(config, source)
    vision_config = CLIPVisionConfig.from_pretrained(str(vision_tower))
    if vision_config.hidden_size != config["mm_hidden_size"]:
        raise ConversionError(f"{vision_tower}: CLIP hidden size {vision_config.hidden_size}, but {config_path} "
                              f"says mm_hidden_size {config['mm_hidden_size']}")
    weights = {}
    for key, tensor in read_checkpoint_weights(source).items():
        if key.endswith(".inv_freq"):  # rotary buffers some LLaVA checkpoints carry; recomputed by HF Llama
            continue
        new = rename(key, ORIGINAL_LLAVA)
        if new is None:
            raise ConversionError(f"{source}: unexpected tensor {key!r}")
        weights[new] = tensor
    tower = {k: weights.pop(k) for k in [k for k in weights if k.startswith("model.vision_tower.")]}
    vision = CLIPVisionModel.from_pretrained(str(vision_tower), dtype=torch_dtype)
    if tower:  # the checkpoint's own tower, saved under an older transformers' names (vision_model.*)
        stripped = {k.removeprefix("model.vision_tower."): v for k, v in tower.items()}
        current = set(vision.state_dict())
        stripped = {(k if k in current else k.removeprefix("vision_model.")): v for k, v in stripped.items()}
        missing = sorted(current - set(stripped))
        if missing:
            raise ConversionError(f"{source}: the checkpoint's vision tower lacks {', '.join(missing[:3])}")
        vision.load_state_dict(stripped, strict=True)
    weights.update({rename(key, CLIP_VISION): tensor for key, tensor in vision.state_dict().items()})
    aspect = config.get("image_aspect_ratio", "pad")
    return assemble_llava(
        text_config=text_config, vision_config=vision_config, weights=weights,
        tokenizer=AutoTokenizer.from_pretrained(str(source)),
        image_processor=CLIPImageProcessor.from_pretrained(str(vision_tower)),
        output=output, prompt_format=PromptFormat(image_aspect_ratio="pad" if aspect == "pad" else "crop"),
        dtype=torch_dtype, seed=seed, overwrite=overwrite,
        sources={"original_checkpoint": str(source), "vision_tower": str(vision_tower)},
    )
