"""Merging adapters into the base weights and undoing it."""

from __future__ import annotations

import pytest
import torch

from road_vlm.adapters import (
    AdapterConfig,
    AdapterStateError,
    adapted_layers,
    add_adapter,
    merge_adapter,
    per_sample_adapters,
    set_active_adapter,
    unload_adapters,
    unmerge_adapter,
)

ALL_VARIANTS = ["road1", "road2", "road4", "lora", "road1_lora"]


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone() for n, layer in adapted_layers(model).items()} | {
        n + ".bias": layer.base_layer.bias.detach().clone() for n, layer in adapted_layers(model).items()
    }


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_merged_forward_equals_unmerged_and_unmerge_restores_w0(adx, variant, dtype, atol):
    model = adx.build_tiny(dtype=dtype)
    add_adapter(model, AdapterConfig(variant=variant, group_size=adx.GROUP, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    adx.randomize_adapter(model, "default", seed=7)
    inputs = adx.make_inputs(batch=2)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    w0 = _base_weights(model)
    with torch.no_grad():
        unmerged = model(**inputs).logits
        merge_adapter(model, "default")
        assert any(not torch.equal(w0[n], layer.base_layer.weight) for n, layer in adapted_layers(model).items())
        merged = model(**inputs).logits  # R must not be applied a second time
        unmerge_adapter(model)
        after = model(**inputs).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=atol)
    torch.testing.assert_close(after, unmerged, rtol=0, atol=atol)
    for key, w in _base_weights(model).items():
        torch.testing.assert_close(w, w0[key], rtol=0, atol=atol)


def test_merge_state_is_guarded(adx):
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road4", group_size=adx.GROUP), name="a")
    add_adapter(model, AdapterConfig(variant="road2", group_size=adx.GROUP), name="b")
    with pytest.raises(AdapterStateError, match="no adapter is merged"):
        unmerge_adapter(model)
    merge_adapter(model, "a")
    with pytest.raises(AdapterStateError, match="already merged"):
        merge_adapter(model, "b")
    with pytest.raises(AdapterStateError, match="merged"):
        set_active_adapter(model, "b")
    with pytest.raises(AdapterStateError, match="merged"):
        with per_sample_adapters(model, ["a", "b"]):
            pass
    with pytest.raises(AdapterStateError, match="no adapter named 'zzz'"):
        merge_adapter(model, "zzz")
    unmerge_adapter(model)
    set_active_adapter(model, "b")


def test_unmerge_refuses_singular_rotation_before_touching_any_layer(adx):
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road2", group_size=adx.GROUP))
    adx.randomize_adapter(model, "default", seed=1)
    layers = adapted_layers(model)
    bad_name = "model.language_model.layers.1.mlp.up_proj"
    with torch.no_grad():
        layers[bad_name].road_alpha["default"][[0, 8]] = 0.0  # dims 0 and 0 + 16/2 form one block
    merge_adapter(model, "default")
    merged = _base_weights(model)
    with pytest.raises(AdapterStateError, match=rf"{bad_name.replace('.', '[.]')}: cannot unmerge.*dims 0 and 8"):
        unmerge_adapter(model)
    for key, w in _base_weights(model).items():
        assert torch.equal(w, merged[key]), key


def test_merge_then_unload_gives_a_plain_model_with_the_merged_function(adx):
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road1_lora", group_size=adx.GROUP, lora_r=4, lora_alpha=8))
    adx.randomize_adapter(model, "default", seed=9)
    inputs = adx.make_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
        merge_adapter(model)
        unload_adapters(model)
        got = model(**inputs).logits
    assert not adapted_layers(model)
    assert set(model.state_dict()) == set(adx.build_tiny().state_dict())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
