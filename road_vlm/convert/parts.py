"""``road-vlm build-base``: LLaVA-1.5's stage-2 starting point from its parts.

LLaVA's LoRA recipe (``scripts/v1_5/finetune_lora.sh``) starts from Vicuna-7B-v1.5 + CLIP ViT-L/14-336 + the
stage-1 projector (``mm_projector.bin`` of ``liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5``), not
from the finished LLaVA. This assembles exactly that into one HF ``LlavaForConditionalGeneration`` directory that
every road_vlm command loads. Without a projector file the projector is initialised as LLaVA's stage 1 builds it
(PyTorch's default ``nn.Linear`` initialisation, seeded), ready for stage-1 training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from road_vlm.convert.assemble import ConversionError, assemble_llava, load_tensor_file
from road_vlm.convert.keys import CLIP_VISION, LLAMA, MM_PROJECTOR, rename
from road_vlm.model import resolve_dtype
from road_vlm.filenames import HF_CONFIG, PROJECTOR


def _renamed(state: dict[str, torch.Tensor], mapping: list[tuple[str, str]], where: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        new = rename(key, mapping)
        if new is None:
            raise ConversionError(f"{where}: unexpected tensor {key!r}")
        out[new] = tensor
    return out


def load_projector(path: str | Path, vision_hidden: int, text_hidden: int) -> dict[str, torch.Tensor]:
    """LLaVA's ``mm_projector.bin`` (or its safetensors twin), or road_vlm's ``projector.safetensors`` (a file or
    the stage-1 checkpoint directory holding it), as ``model.multi_modal_projector.*`` tensors."""
    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR
    if not path.is_file():
        raise ConversionError(f"{path}: projector file not found")
    state = _renamed(load_tensor_file(path), MM_PROJECTOR, str(path))
    want = {"linear_1.weight": (text_hidden, vision_hidden), "linear_1.bias": (text_hidden,),
            "linear_2.weight": (text_hidden, text_hidden), "linear_2.bias": (text_hidden,)}
    if set(state) != set(want):
        raise ConversionError(f"{path}: expected the tensors of a 2-layer MLP projector (mlp2x_gelu: "
                              f"mm_projector.0 / .2 weight and bias), found {sorted(state)}")
    for key, shape in want.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(f"{path}: {key} has shape {tuple(state[key].shape)}; this CLIP ({vision_hidden}) "
                                  f"and language model ({text_hidden}) need {shape}")
    return {f"model.multi_modal_projector.{k}": v for k, v in state.items()}


def init_projector(vision_hidden: int, text_hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """LLaVA's stage-1 starting projector: Linear -> GELU -> Linear with PyTorch's default initialisation."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        first, second = nn.Linear(vision_hidden, text_hidden), nn.Linear(text_hidden, text_hidden)
    finally:
        torch.random.set_rng_state(generator_state)
    return {f"model.multi_modal_projector.linear_{i}.{name}": p.detach()
            for i, layer in ((1, first), (2, second)) for name, p in layer.named_parameters()}


def build_base(
    vision_tower: str | Path,
    language_model: str | Path,
    output: str | Path,
    *,
    projector: str | Path | None = None,
    dtype: str | torch.dtype = "float16",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """CLIP vision tower (HF ``openai/clip-vit-large-patch14-336`` layout) + Llama/Vicuna (HF layout) + optional
    stage-1 projector file -> an HF LLaVA-1.5 directory at ``output``."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM

    torch_dtype = resolve_dtype(dtype, "cpu")
    for path, what in ((vision_tower, "vision tower (CLIP)"), (language_model, "language model")):
        if not (Path(path) / HF_CONFIG).is_file():
            raise ConversionError(f"{path}: not a Hugging Face model directory ({what}: no config.json)")
    vision = CLIPVisionModel.from_pretrained(str(vision_tower), dtype=torch_dtype)
    language = LlamaForCausalLM.from_pretrained(str(language_model), dtype=torch_dtype)
    weights = {
        **_renamed(vision.state_dict(), CLIP_VISION, str(vision_tower)),
        **_renamed(language.state_dict(), LLAMA, str(language_model)),
    }
    vision_hidden, text_hidden = vision.config.hidden_size, language.config.hidden_size
    weights.update(load_projector(projector, vision_hidden, text_hidden) if projector is not None
                   else init_projector(vision_hidden, text_hidden, seed))
    return assemble_llava(
        text_config=language.config, vision_config=vision.config, weights=weights,
        tokenizer=AutoTokenizer.from_pretrained(str(language_model)),
        image_processor=CLIPImageProcessor.from_pretrained(str(vision_tower)),
        output=output, dtype=torch_dtype, seed=seed, overwrite=overwrite,
        sources={"vision_tower": str(vision_tower), "language_model": str(language_model),
                 "projector": str(projector) if projector is not None else "initialised (stage 1)"},
    )
