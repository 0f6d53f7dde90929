"""What the benchmark scripts share: the repository on ``sys.path`` (so ``python scripts/<name>.py`` runs from a
checkout that was not pip-installed), LLaVA-1.5-7B's architecture for random-weight benchmarks, and random adapter
weights. Scripts import it before ``road_vlm``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Vicuna-7B, the language model of LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf).
LM_LAYERS, LM_HIDDEN, LM_INTERMEDIATE, LM_VOCAB = 32, 4096, 11008, 32064
IMAGE_TOKEN_ID = 32000
NUM_IMAGE_TOKENS, IMAGE_SIZE = 576, 336  # CLIP ViT-L/14 at 336 px: 24 x 24 patches


def llava15_7b_config(num_layers: int | None = None) -> Any:
    """LLaVA-1.5-7B (CLIP ViT-L/14-336 + 2-layer GELU projector + Vicuna-7B); ``num_layers`` decoder layers
    instead of 32 keep a short check short with the same layer shapes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=IMAGE_SIZE, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=LM_HIDDEN, intermediate_size=LM_INTERMEDIATE, num_hidden_layers=num_layers or LM_LAYERS,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=LM_VOCAB,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, pad_token_id=0,
                       projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=NUM_IMAGE_TOKENS)


def llava15_7b_narrow_config(num_layers: int = LM_LAYERS, width: int = 512) -> Any:
    """LLaVA-1.5-7B's layer count and MLP ratio at hidden size ``width`` (a multiple of 64), with a one-layer vision
    tower and a small vocabulary: for costs that are per layer rather than per weight."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    text = LlamaConfig(hidden_size=width, intermediate_size=width * LM_INTERMEDIATE // LM_HIDDEN // 64 * 64,
                       num_hidden_layers=num_layers, num_attention_heads=max(1, width // 64), vocab_size=1000)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=999)


def randomize_(params: list[Any], seed: int, scale: float = 0.02) -> None:
    """Add ``scale`` x N(0, 1) noise to ``params`` in place: adapters that are not the identity, so every row of a
    mixed batch really computes its own rotation."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) * scale)
