"""Config schema, overrides, shipped recipes and DeepSpeed "auto" filling."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from road_vlm.train.config import ConfigError, config_from_dict, load_config, parse_override
from road_vlm.train.ds_config import DeepSpeedConfigError, build_deepspeed_config, read_deepspeed_json

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["llava15_7b_road4.yaml", "llava15_7b_road1_lora.yaml", "llava15_13b_road4.yaml", "demo.yaml",
           "llava15_7b_pretrain.yaml"]
MINIMAL = {"model": {"name_or_path": "m"}, "data": {"path": "d.json"}, "output": {"dir": "out"}}


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_load_and_document_every_key(name: str):
    path = REPO / "configs" / name
    config = load_config(path)
    text = path.read_text().splitlines()
    # Every key is documented in the file.
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key in values:
            lines = [i for i, line in enumerate(text) if line.strip().startswith(f"{key}:")]
            assert lines, f"{name}: {section}.{key} not found"
            i = lines[0]
            # A comment on the line, or above a group of consecutive keys that it describes together.
            j = i - 1
            while j > 0 and text[j].startswith("  ") and not text[j].strip().startswith("#"):
                j -= 1
            assert "#" in text[i] or text[j].strip().startswith("#"), f"{name}: {section}.{key} is undocumented"
    assert (REPO / config.deepspeed.config).is_file()


def test_llava_recipes_follow_stage2_settings():
    for name in RECIPES[:3]:
        c = load_config(REPO / "configs" / name)
        assert c.train.per_device_batch_size * c.train.gradient_accumulation_steps * 8 == 128
        assert (c.train.num_epochs, c.train.max_steps, c.train.lr_scheduler, c.train.warmup_ratio) == (1, -1, "cosine", 0.03)
        assert c.data.max_length == 2048 and c.train.bf16 and c.train.gradient_checkpointing
        assert c.train.projector_lr == 2e-5 and c.adapter.train_projector
        assert 1e-3 <= c.train.learning_rate <= 2e-3
        # The paper's starting point: the build-base output (Vicuna + CLIP + stage-1 projector), not llava-hf.
        assert c.model.name_or_path.startswith("checkpoints/llava-v1.5-") and c.model.name_or_path.endswith("-base")
        assert c.data.template == "vicuna_v1" and c.data.image_aspect_ratio == "pad"


def test_stage1_recipe_follows_llava_pretrain_sh():
    c = load_config(REPO / "configs" / "llava15_7b_pretrain.yaml")
    assert (c.adapter.variant, c.adapter.train_projector) == ("none", True)
    assert c.train.per_device_batch_size * c.train.gradient_accumulation_steps * 8 == 256
    assert c.train.projector_lr == 1e-3 and c.train.weight_decay == 0.0 and c.train.max_grad_norm == 0.0
    assert (c.train.num_epochs, c.train.lr_scheduler, c.train.warmup_ratio, c.data.max_length) == (1, "cosine", 0.03, 2048)
    assert c.data.template == "plain" and c.data.image_aspect_ratio == "crop" and not c.data.group_by_modality_length
    assert c.deepspeed.config.endswith("zero2.json")


def test_overrides_are_parsed_as_yaml_scalars_and_lists():
    c = config_from_dict(MINIMAL, overrides=["train.learning_rate=1e-3", "train.bf16=true",
                                             "adapter.target_modules=[q_proj, v_proj]", "train.save_total_limit=null"])
    assert c.train.learning_rate == 1e-3 and c.train.bf16 is True
    assert c.adapter.target_modules == ["q_proj", "v_proj"] and c.train.save_total_limit is None
    assert parse_override("output.dir=a=b") == (["output", "dir"], "a=b")


@pytest.mark.parametrize("override, key", [
    ("train.learing_rate=1", "train.learing_rate"),
    ("trian.seed=1", "trian"),
    ("adapter.rank=4", "adapter.rank"),
])
def test_unknown_keys_are_errors_naming_the_key(override: str, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(MINIMAL, overrides=[override])


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=ten", "train.max_steps"),
    ("train.bf16=1", "train.bf16"),
    ("train.learning_rate=fast", "train.learning_rate"),
    ("data.on_bad_image=ignore", "data.on_bad_image"),
    ("train.per_device_batch_size=0", "train.per_device_batch_size"),
])
def test_wrong_types_and_values_are_errors_naming_the_key(override: str, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(MINIMAL, overrides=[override])


@pytest.mark.parametrize("override, choices", [
    ("data.template=v2", "vicuna_v1, plain"),
    ("data.image_aspect_ratio=fit", "pad, crop"),
    ("data.on_bad_image=ignore", "error, skip"),
    ("train.lr_scheduler=step", "cosine, linear, constant"),
    ("output.report_to=mlflow", "tensorboard, wandb, none"),
    ("model.dtype=half", "auto, float32, fp32, bfloat16, bf16, float16, fp16"),
    ("model.quantization=nf5", "none, nf4, fp4, int8"),
])
def test_a_setting_with_choices_lists_them_when_the_value_is_not_one(override: str, choices: str):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=f"'{key}' must be one of {choices}, got '{value}'"):
        config_from_dict(MINIMAL, overrides=[override])


def test_adapter_section_errors_and_required_keys(tmp_path: Path):
    with pytest.raises(ConfigError, match="variant"):
        config_from_dict(MINIMAL, overrides=["adapter.variant=road3"])
    with pytest.raises(ConfigError, match="output.dir"):
        config_from_dict({k: v for k, v in MINIMAL.items() if k != "output"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  seed: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path: Path):
    c = config_from_dict(MINIMAL, overrides=["adapter.variant=road1_lora", "adapter.lora_r=16"])
    path = c.save(tmp_path / "config.yaml")
    assert load_config(path) == c


def _ds(name: str, **train) -> dict:
    c = config_from_dict(MINIMAL, overrides=[f"train.{k}={v}" for k, v in train.items()])
    raw = read_deepspeed_json(REPO / "configs" / "deepspeed" / name)
    return build_deepspeed_config(raw, c, world_size=8, hidden_size=4096, source=name)


def test_auto_values_are_filled_like_hf():
    ds = _ds("zero3.json", per_device_batch_size=16, gradient_accumulation_steps=2, bf16="true")
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 * 2 * 8
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["stage3_param_persistence_threshold"] == 40960
    assert "auto" not in json.dumps(ds)


def test_offload_config_drops_optimizer_and_scheduler_with_a_notice(caplog):
    with caplog.at_level(logging.WARNING):
        ds = _ds("zero3_offload.json", max_grad_norm=0.5)
    assert "optimizer" not in ds and "scheduler" not in ds
    assert "projector" in caplog.text and "WarmupLR" in caplog.text
    assert ds["gradient_clipping"] == 0.5


def test_explicit_batch_that_contradicts_the_training_config_is_an_error(tmp_path: Path):
    c = config_from_dict(MINIMAL)
    raw = read_deepspeed_json(REPO / "configs" / "deepspeed" / "zero2.json")
    raw["train_micro_batch_size_per_gpu"] = 3
    with pytest.raises(DeepSpeedConfigError, match="train_micro_batch_size_per_gpu"):
        build_deepspeed_config(raw, c, world_size=1, hidden_size=64)
    broken = tmp_path / "ds.json"
    broken.write_text('{\n  "bf16": {\n    "enabled": auto\n  }\n}\n')
    with pytest.raises(DeepSpeedConfigError, match=r"ds\.json:3"):
        read_deepspeed_json(broken)


@pytest.mark.parametrize("recipe", ["llava15_7b_road4.yaml", "llava15_13b_road4.yaml", "llava15_7b_road1_lora.yaml"])
def test_paper_recipes_clip_no_gradients_like_llava_with_zero3(recipe: str):
    # LLaVA's zero3.json has no gradient_clipping key, so HF's DeepSpeed integration clips nothing.
    c = load_config(REPO / "configs" / recipe)
    assert c.deepspeed.config.endswith("zero3.json") and c.train.max_grad_norm == 0.0
    raw = read_deepspeed_json(REPO / "configs" / "deepspeed" / "zero3.json")
    assert "gradient_clipping" not in raw
    assert build_deepspeed_config(raw, c, world_size=8, hidden_size=4096)["gradient_clipping"] == 0.0
