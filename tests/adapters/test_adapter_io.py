"""Adapter directories: round trips, PEFT interop in both directions, ZeRO-3 gathering, bad-input errors."""

from __future__ import annotations

import contextlib
import json
import sys
import types

import pytest
import torch
from peft import PeftModel, RoadConfig, get_peft_model
from safetensors.torch import load_file, save_file

from road_vlm.adapters import (
    AdapterConfig,
    AdapterFileError,
    AdapterStateError,
    adapted_layers,
    add_adapter,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from road_vlm.adapters.inject import peft_target_regex, registry

ALL_VARIANTS = ["road1", "road2", "road4", "lora", "road1_lora"]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _saved(adx, tmp_path, variant="road4", train_projector=False, name="default"):
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant=variant, group_size=adx.GROUP, lora_r=4, lora_alpha=8,
                                     train_projector=train_projector), name=name)
    adx.randomize_adapter(model, name, seed=5)
    if train_projector:
        with torch.no_grad():
            for p in model.model.multi_modal_projector.parameters():
                p.add_(0.05)
    out = save_adapter(model, tmp_path / "adapter", name=name)
    return model, out


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_save_load_round_trip(adx, tmp_path, variant):
    model, path = _saved(adx, tmp_path, variant, train_projector=(variant == "road1_lora"))
    inputs = adx.make_inputs()
    fresh = adx.build_tiny()
    assert load_adapter(fresh, path, name="loaded") == "loaded"
    torch.testing.assert_close(_logits(fresh, inputs), _logits(model, inputs), rtol=0, atol=0)
    cfg = registry(fresh).configs["loaded"]
    assert cfg.variant == variant and cfg.train_projector == (variant == "road1_lora")
    assert (path / "projector.safetensors").is_file() == (variant == "road1_lora")
    assert all(p.requires_grad == ("loaded" in n or "multi_modal_projector" in n and cfg.train_projector)
               for n, p in fresh.named_parameters())


def test_road_directory_loads_in_peft_with_identical_logits(adx, tmp_path):
    model, path = _saved(adx, tmp_path, "road4")
    raw = json.loads((path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ROAD" and raw["variant"] == "road_4"
    peft_model = PeftModel.from_pretrained(adx.build_tiny(), str(path)).eval()
    # PEFT adapted exactly our layers: none of the vision tower.
    peft_layers = {n.removeprefix("base_model.model.").rsplit(".road_theta", 1)[0]
                   for n, _ in peft_model.named_parameters() if ".road_theta." in n}
    assert peft_layers == set(adapted_layers(model))
    inputs = adx.make_inputs()
    torch.testing.assert_close(_logits(peft_model, inputs), _logits(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["road1", "road2", "road4"])
def test_peft_directory_loads_into_road_vlm_with_identical_logits(adx, tmp_path, variant):
    torch.manual_seed(11)
    ref = adx.build_tiny()
    cfg = RoadConfig(variant=variant.replace("road", "road_"), group_size=adx.GROUP, init_weights=False,
                     target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)")
    peft_model = get_peft_model(ref, cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = adx.build_tiny()
    load_adapter(ours, tmp_path / "peft")
    assert len(adapted_layers(ours)) == 6
    inputs = adx.make_inputs()
    out = _logits(ours, inputs)
    torch.testing.assert_close(out, _logits(peft_model, inputs), rtol=0, atol=0)
    assert not torch.allclose(out, _logits(adx.build_tiny(), inputs), atol=1e-3)


def test_peft_directory_touching_the_vision_tower_is_refused(adx, tmp_path):
    peft_model = get_peft_model(adx.build_tiny(), RoadConfig(variant="road_1", group_size=adx.GROUP,
                                                              target_modules=["q_proj"]))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = adx.build_tiny()
    with pytest.raises(AdapterFileError,
                       match=r"unexpected tensor.*vision_tower\.encoder\.layers\.0\.self_attn\.q_proj"):
        load_adapter(model, tmp_path / "peft")
    assert not adapted_layers(model) and not registry(model).configs


def _rewrite(path, fn):
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


KEY = "base_model.model.model.language_model.layers.0.self_attn.q_proj.road_theta"


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda t: t.pop(KEY), r"missing 1 adapter tensor.*layers\.0\.self_attn\.q_proj\.road_theta"),
        (lambda t: t.__setitem__(KEY.replace("q_proj", "zz_proj"), torch.ones(3)), r"unexpected tensor.*zz_proj"),
        (lambda t: t.__setitem__(KEY, torch.zeros(7)),
         r"q_proj\.road_theta has shape \(7,\), the base model needs \(128,\)"),
        (lambda t: t[KEY].__setitem__(5, float("nan")), r"q_proj\.road_theta contains NaN"),
    ],
    ids=["missing", "extra", "shape", "nonfinite"],
)
def test_bad_adapter_files_are_refused_and_leave_the_model_untouched(adx, tmp_path, mutate, pattern):
    _, path = _saved(adx, tmp_path, "road4")
    _rewrite(path, mutate)
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road2", group_size=adx.GROUP), name="keep")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterFileError, match=pattern) as info:
        load_adapter(model, path, name="bad")
    assert "adapter_model.safetensors" in str(info.value)
    after = dict(model.named_parameters())
    assert set(after) == set(before)  # no half-attached parameters
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert list(registry(model).configs) == ["keep"] and registry(model).active == "keep"


def test_bad_config_files_name_the_file(adx, tmp_path):
    _, path = _saved(adx, tmp_path, "lora")
    cfg_file = path / "adapter_config.json"
    cfg_file.write_text("{\n  \"format\": \"road_vlm\",\n  oops\n}")
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: invalid JSON at line 3"):
        load_adapter(adx.build_tiny(), path)
    cfg_file.write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: not a road_vlm adapter nor a PEFT RoAd"):
        read_adapter_config(path)
    cfg_file.write_text(json.dumps({"format": "road_vlm", "variant": "road3"}))
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: unknown adapter variant 'road3'"):
        read_adapter_config(path)
    with pytest.raises(AdapterFileError, match="not a directory"):
        load_adapter(adx.build_tiny(), tmp_path / "nope")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -4.0, 0])
def test_config_values_are_validated_not_only_shapes(adx, tmp_path, alpha):
    _, path = _saved(adx, tmp_path, "lora")
    cfg_file = path / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "lora_alpha": alpha}))  # NaN/Infinity literals
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: lora_alpha must be a positive finite number"):
        load_adapter(adx.build_tiny(), path)


def test_prompt_format_rejects_a_boolean_max_length(tmp_path):
    from road_vlm.data.template import PromptFormat

    (tmp_path / "prompt_format.json").write_text(json.dumps({"template": "vicuna_v1", "max_length": True}))
    with pytest.raises(ValueError, match=r"prompt_format\.json: invalid prompt format: max_length must be a positive "
                                         r"integer, got True"):
        PromptFormat.load(tmp_path)


def test_projector_file_is_validated(adx, tmp_path):
    _, path = _saved(adx, tmp_path, "road1_lora", train_projector=True)
    (path / "projector.safetensors").unlink()
    with pytest.raises(AdapterFileError, match=r"projector\.safetensors: not found"):
        load_adapter(adx.build_tiny(), path)


def test_duplicate_name_is_refused(adx, tmp_path):
    _, path = _saved(adx, tmp_path, "road2")
    model = adx.build_tiny()
    load_adapter(model, path)
    with pytest.raises(AdapterStateError, match="already exists"):
        load_adapter(model, path)
    assert load_adapter(model, path, name="second") == "second"


class _FakeZero3:
    """Stands in for ZeRO-3: parameters are empty shards until GatheredParameters fills them."""

    def __init__(self, params):
        self.full = {id(p): p.data for p in params}
        self.calls = []
        for p in params:
            p.ds_id = id(p)
            p.data = torch.empty(0)

    def module(self, fill: bool):
        owner = self

        @contextlib.contextmanager
        def gathered(params, modifier_rank=None):
            owner.calls.append((len(params), modifier_rank))
            if fill:
                for p in params:
                    p.data = owner.full[id(p)]
            yield
            for p in params:
                p.data = torch.empty(0)

        return types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=gathered))


def test_zero3_parameters_are_gathered_and_only_rank0_writes(adx, tmp_path, monkeypatch):
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road4", group_size=adx.GROUP))
    adx.randomize_adapter(model, "default", seed=2)
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fake = _FakeZero3([p for p in model.parameters() if p.requires_grad])
    monkeypatch.setitem(sys.modules, "deepspeed", fake.module(fill=True))

    save_adapter(model, tmp_path / "rank0")
    assert fake.calls == [(len(expected), None)]
    saved = load_file(str(tmp_path / "rank0" / "adapter_model.safetensors"))
    assert len(saved) == len(expected)
    for n, v in expected.items():
        module, kind, _ = n.rsplit(".", 2)
        assert torch.equal(saved[f"base_model.model.{module}.{kind}"], v)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    save_adapter(model, tmp_path / "rank1")  # still gathers (collective) but writes nothing
    assert len(fake.calls) == 2 and not (tmp_path / "rank1").exists()


def test_zero3_shards_that_stay_empty_are_never_written(adx, tmp_path, monkeypatch):
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road1", group_size=adx.GROUP))
    fake = _FakeZero3([p for p in model.parameters() if p.requires_grad])
    monkeypatch.setitem(sys.modules, "deepspeed", fake.module(fill=False))
    with pytest.raises(AdapterStateError, match=r"refusing to save .*road_(theta|alpha): it has shape \(0,\)"):
        save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_peft_target_regex_is_exact_for_a_layer_subset(adx):
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road1", group_size=adx.GROUP,
                                     target_modules=r"model\.language_model\.layers\.1\.self_attn\.(q|v)_proj"))
    names = sorted(adapted_layers(model))
    regex = peft_target_regex(model, names)
    assert "layers\\.1\\." in regex  # not generalised to every layer


def test_projector_shape_mismatch_and_conflicts_are_refused(adx, tmp_path):
    _, path = _saved(adx, tmp_path, "road1_lora", train_projector=True)
    proj_file = path / "projector.safetensors"
    good = load_file(str(proj_file))
    bad = dict(good)
    bad["model.multi_modal_projector.linear_1.weight"] = torch.zeros(3, 3)
    save_file(bad, str(proj_file))
    model = adx.build_tiny()
    with pytest.raises(AdapterFileError, match=r"projector\.safetensors: tensor model\.multi_modal_projector\.linear_1"
                                               r"\.weight has shape \(3, 3\), the base model needs \(64, 32\)"):
        load_adapter(model, path)
    assert not registry(model).configs
    save_file(good, str(proj_file))
    load_adapter(model, path, name="first")
    torch.testing.assert_close(model.model.multi_modal_projector.linear_1.weight,
                               good["model.multi_modal_projector.linear_1.weight"], rtol=0, atol=0)
    with pytest.raises(AdapterStateError, match=r"projector of adapter 'first' is already loaded"):
        load_adapter(model, path, name="second")
    assert load_adapter(model, path, name="second", load_projector=False) == "second"
