"""Where adapters go, what trains, parameter counts, and config validation."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from road_vlm.adapters import (
    DEFAULT_TARGET_MODULES,
    AdapterConfig,
    AdapterConfigError,
    adapted_layers,
    add_adapter,
    set_active_adapter,
    trainable_parameters,
)


def test_default_targets_are_the_seven_language_model_projections_only(adx):
    model = adx.build_tiny()
    names = add_adapter(model, AdapterConfig(variant="road1", group_size=adx.GROUP))
    assert len(names) == 7 * 2
    assert all(n.startswith("model.language_model.layers.") for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == set(DEFAULT_TARGET_MODULES)
    # The CLIP tower has q/k/v_proj too: untouched.
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in adapted_layers(model))
    assert not model.training and not any(layer.training for layer in adapted_layers(model).values())


def test_regex_targets_and_freezing(adx):
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road2", group_size=adx.GROUP,
                                     target_modules=r"model\.language_model\.layers\.1\.mlp\.(up|down)_proj"))
    assert sorted(adapted_layers(model)) == [
        "model.language_model.layers.1.mlp.down_proj", "model.language_model.layers.1.mlp.up_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.language_model.layers.1.mlp.{m}_proj.road_{k}.default"
                         for m in ("up", "down") for k in ("theta", "alpha")}
    assert trainable_parameters(model)[0] == 2 * (128 + 64)


def test_train_projector_and_only_the_active_adapter_trains(adx):
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road4", group_size=adx.GROUP, train_projector=True), name="a")
    proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    road4 = 2 * 4 * (4 * 64 + 2 * 128 + 64)  # layers x 4 x (sum of d_out of the seven projections)
    assert trainable_parameters(model)[0] == road4 + proj
    add_adapter(model, AdapterConfig(variant="lora", group_size=adx.GROUP, lora_r=2), name="b")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and n.endswith(".b") for n in trainable)
    set_active_adapter(model, "a")
    assert trainable_parameters(model)[0] == road4 + proj
    set_active_adapter(model, None)
    assert trainable_parameters(model)[0] == 0
    assert trainable_parameters(model)[1] == sum(p.numel() for p in model.parameters())


def _llava_7b_on_meta() -> LlavaForConditionalGeneration:
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2, image_token_index=32000)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


@pytest.mark.parametrize("variant,expected", [("road1", 1_359_872), ("road2", 2_719_744), ("road4", 5_439_488)])
def test_llava15_7b_parameter_counts(variant, expected):
    model = _llava_7b_on_meta()
    add_adapter(model, AdapterConfig(variant=variant))  # default group_size 64
    trainable, total = trainable_parameters(model)
    assert trainable == expected
    assert 7.0e9 < total - trainable < 7.1e9
    if variant == "road4":
        assert round(100 * trainable / total, 2) == 0.08


def test_llava15_7b_projector_and_lora_counts():
    model = _llava_7b_on_meta()
    add_adapter(model, AdapterConfig(variant="lora", lora_r=128, lora_alpha=256, train_projector=True))
    assert trainable_parameters(model)[0] == 319_815_680 + 20_979_712


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"variant": "road3"}, r"unknown adapter variant 'road3'"),
        ({"group_size": 7}, r"group_size must be a positive even number, got 7"),
        ({"lora_r": 0}, r"lora_r must be a positive int, got 0"),
        ({"lora_r": -4}, r"lora_r must be a positive int"),
        ({"target_modules": []}, r"target_modules must be a non-empty list"),
        ({"target_modules": "(["}, r"not a valid regex"),
        ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0, 1\)"),
    ],
)
def test_config_validation(kwargs, pattern):
    with pytest.raises(AdapterConfigError, match=pattern):
        AdapterConfig(**kwargs)


def test_group_size_must_divide_every_target(adx):
    model = adx.build_tiny()
    with pytest.raises(AdapterConfigError,
                       match=r"group_size 48 does not divide d_out=64 of layer model\.language_model\.layers\.0\."):
        add_adapter(model, AdapterConfig(variant="road4", group_size=48))
    assert not adapted_layers(model)


def test_no_match_lists_what_was_searched(adx):
    model = adx.build_tiny()
    with pytest.raises(AdapterConfigError, match=r"\['qkv'\] matched no nn\.Linear of the language model "
                                                 r"\(model\.language_model, 14 linear layers searched"):
        add_adapter(model, AdapterConfig(variant="road1", group_size=adx.GROUP, target_modules=["qkv"]))


def test_config_round_trips_through_dict_and_yaml():
    cfg = AdapterConfig(variant="road1_lora", group_size=32, target_modules=["q_proj", "v_proj"], lora_r=16,
                        lora_alpha=32, lora_dropout=0.1, train_projector=True)
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    section = yaml.safe_load(
        "adapter:\n  variant: road4\n  group_size: 64\n  target_modules: [q_proj, k_proj]\n  lora_r: 8\n"
        "  lora_alpha: 16\n  lora_dropout: 0.0\n  train_projector: false\n")["adapter"]
    assert AdapterConfig.from_dict(section).target_modules == ["q_proj", "k_proj"]
    with pytest.raises(AdapterConfigError, match=r"unknown adapter config field\(s\) \['rank'\]"):
        AdapterConfig.from_dict({"variant": "road4", "rank": 4})


def test_delete_adapter_removes_its_parameters_only(adx):
    from road_vlm.adapters import AdapterStateError, delete_adapter

    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road4", group_size=adx.GROUP), name="keep")
    add_adapter(model, AdapterConfig(variant="lora", group_size=adx.GROUP, lora_r=2), name="drop")
    delete_adapter(model, "drop")
    assert not any(n.endswith(".drop") for n, _ in model.named_parameters())
    assert sum(n.endswith(".keep") for n, _ in model.named_parameters()) == 2 * 14
    with pytest.raises(AdapterStateError, match=r"no adapter named 'drop'; loaded: \['keep'\]"):
        set_active_adapter(model, "drop")
