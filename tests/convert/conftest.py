"""Tiny LLaVA-1.5 parts written in the real layouts: a CLIPModel directory (openai/clip-vit-large-patch14-336
layout, text tower included), a Llama directory (Vicuna layout: no <image>, no pad token), LLaVA's stage-1
``mm_projector.bin`` (a pickle with ``model.mm_projector.{0,2}`` keys) and an original LLaVA checkpoint
(``LlavaLlamaForCausalLM`` weights in ``pytorch_model-*.bin`` shards with an index, ``mm_*`` config fields)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convert_helpers import IMAGE, PATCH, TEXT_HIDDEN, VISION_HIDDEN


@pytest.fixture(scope="session")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from road_vlm.demo.synthetic import tokenizer_corpus
    from road_vlm.demo.tiny_base import CLIP_MEAN, CLIP_STD, _train_tokenizer

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(1)
    clip = CLIPModel(CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={"hidden_size": VISION_HIDDEN, "intermediate_size": 64, "num_hidden_layers": 3,
                       "num_attention_heads": 2, "image_size": IMAGE, "patch_size": PATCH},
        projection_dim=16))
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3).save_pretrained(root / "clip")

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(list(tokenizer_corpus()), vocab_size=400),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048)
    llama = LlamaForCausalLM(LlamaConfig(
        hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    llama.save_pretrained(root / "vicuna")
    tokenizer.save_pretrained(root / "vicuna")

    projector = {"model.mm_projector.0.weight": torch.randn(TEXT_HIDDEN, VISION_HIDDEN) * 0.1,
                 "model.mm_projector.0.bias": torch.randn(TEXT_HIDDEN) * 0.1,
                 "model.mm_projector.2.weight": torch.randn(TEXT_HIDDEN, TEXT_HIDDEN) * 0.1,
                 "model.mm_projector.2.bias": torch.randn(TEXT_HIDDEN) * 0.1}
    torch.save(projector, root / "mm_projector.bin")

    # The original LLaVA layout: Llama weights + projector under LlavaLlamaForCausalLM names, two .bin shards.
    original = root / "llava-v1.5-tiny"
    original.mkdir()
    state = {**llama.state_dict(), **projector}
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, original / name)
    (original / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}))
    config = {**llama.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
              "mm_hidden_size": VISION_HIDDEN, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
              "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False}
    (original / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(original)
    return {"clip": root / "clip", "vicuna": root / "vicuna", "projector": root / "mm_projector.bin",
            "original": original}


