"""Weight-name maps from the original LLaVA-1.5 layouts to HF ``LlavaForConditionalGeneration`` (transformers 5).

Data, not code: each map is a list of (source prefix, target prefix) pairs, tried in order; the first source
prefix a key starts with is replaced. Keys that no prefix matches are reported, never dropped silently.
"""

from __future__ import annotations

# LLaVA's stage-1 projector file (mm_projector.bin: ``nn.Sequential(Linear, GELU, Linear)`` saved from the
# training model, so the keys carry the model prefix): model.mm_projector.{0,2}.{weight,bias}.
MM_PROJECTOR = [
    ("model.mm_projector.0.", "linear_1."),
    ("model.mm_projector.2.", "linear_2."),
    ("mm_projector.0.", "linear_1."),  # the same file saved without the model prefix
    ("mm_projector.2.", "linear_2."),
    ("model.multi_modal_projector.", ""),  # road_vlm's projector.safetensors (a stage-1 checkpoint of ours)
]

# An original LLaVA-1.5 checkpoint (liuhaotian/llava-v1.5-7b / -13b: LlavaLlamaForCausalLM). The vision tower
# is usually not in the weights (it is loaded from config.mm_vision_tower at run time); when it is, it sits
# under model.vision_tower.vision_tower (LLaVA's CLIPVisionTower wraps a CLIPVisionModel).
ORIGINAL_LLAVA = [
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
]

# The state dict of a loaded ``CLIPVisionModel`` (transformers reads any CLIP checkpoint, openai's CLIPModel
# layout with its text tower included, into one): LLaVA's vision tower *is* that module, so its keys carry over
# whatever names the installed transformers gives them.
CLIP_VISION = [("", "model.vision_tower.")]

# The state dict of a loaded ``LlamaForCausalLM`` (Llama / Vicuna).
LLAMA = [
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
]


def rename(key: str, mapping: list[tuple[str, str]]) -> str | None:
    """``key`` with its first matching source prefix replaced, or None when no prefix matches."""
    for source, target in mapping:
        if key.startswith(source):
            return target + key[len(source):]
    return None
