"""Tiny LLaVA models built in memory from a config (no files, no hub) for the adapter engine tests."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from peft import RoadConfig, get_peft_model

from road_vlm.adapters import adapted_layers, refresh_coefficients
from road_vlm.adapters.config import PEFT_VARIANT
from road_vlm.adapters.inject import peft_target_regex

VOCAB = 128
IMAGE_TOKEN = 127
PAD_TOKEN = 0
NUM_IMAGE_TOKENS = 16  # image 32 / patch 8 -> 4x4 patches (CLS dropped by the "default" feature strategy)
GROUP = 16


def tiny_config() -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=256,
        pad_token_id=PAD_TOKEN, bos_token_id=1, eos_token_id=2, attention_bias=True, mlp_bias=True,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
        pad_token_id=PAD_TOKEN,
    )


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        # Biases on the adapted projections (transformers initialises them to zero) so that merging b' = R b
        # is exercised; LLaMA itself has none, other bases do.
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model.to(dtype)


@pytest.fixture(scope="session")
def _tiny_master() -> LlavaForConditionalGeneration:
    return build_tiny()


@pytest.fixture
def tiny_llava(_tiny_master) -> LlavaForConditionalGeneration:
    """A fresh copy of the tiny LLaVA (fp32, eval mode)."""
    return copy.deepcopy(_tiny_master)


@pytest.fixture
def fresh_tiny():
    """Factory for independent copies of the same tiny base model (same weights every call)."""
    master = build_tiny()
    return lambda: copy.deepcopy(master)


def randomize_adapter(model, name: str, seed: int) -> None:
    """Give adapter ``name`` random non-identity values (alpha around 1, theta spread, LoRA non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for kind, p in layer.adapter_parameters(name).items():
                if kind == "road_theta":
                    v = torch.randn(p.shape, generator=gen) * 0.7
                elif kind == "road_alpha":
                    v = 1.0 + torch.randn(p.shape, generator=gen) * 0.3
                else:
                    v = torch.randn(p.shape, generator=gen) * 0.2
                p.copy_(v.to(p.dtype))
    refresh_coefficients(model, name)  # an in-place edit in eval mode: the documented call


def make_inputs(batch: int = 3, seq: int = 6, seed: int = 0, with_image: bool = True) -> dict:
    """Token ids (+ one image per row, image tokens first) for the tiny model."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, IMAGE_TOKEN - 1, (batch, seq), generator=gen)
    if not with_image:
        return {"input_ids": text, "attention_mask": torch.ones_like(text)}
    img = torch.full((batch, NUM_IMAGE_TOKENS), IMAGE_TOKEN)
    ids = torch.cat([text[:, :1], img, text[:, 1:]], dim=1)
    pixels = torch.randn(batch, 3, 32, 32, generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def peft_twin(base, ours, names: list[str], variants: list[str], group_size: int):
    """Wrap ``base`` (an unadapted copy of the same weights) with PEFT RoAd adapters holding our values."""
    layers = adapted_layers(ours)
    pm = None
    for name, variant in zip(names, variants):
        targets = sorted(n for n, layer in layers.items() if name in layer.specs)
        cfg = RoadConfig(variant=PEFT_VARIANT[variant], group_size=group_size,
                         target_modules=peft_target_regex(ours, targets))
        if pm is None:
            pm = get_peft_model(base, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    with torch.no_grad():
        for module_name, layer in layers.items():
            twin = pm.base_model.model.get_submodule(module_name)
            for name in names:
                if name in layer.specs:
                    twin.road_theta[name].copy_(layer.road_theta[name])
                    twin.road_alpha[name].copy_(layer.road_alpha[name])
    return pm.eval()


@pytest.fixture
def adx():
    """The helpers and constants above, for test modules (test dirs are not packages, so no imports)."""
    return types.SimpleNamespace(
        GROUP=GROUP, VOCAB=VOCAB, IMAGE_TOKEN=IMAGE_TOKEN, PAD_TOKEN=PAD_TOKEN,
        build_tiny=build_tiny, tiny_config=tiny_config, randomize_adapter=randomize_adapter,
        make_inputs=make_inputs, peft_twin=peft_twin,
    )


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny matmuls are 100x slower with 2 intra-op threads on the shared, oversubscribed 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
