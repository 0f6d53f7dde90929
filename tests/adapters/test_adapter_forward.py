"""Forward behaviour of adapted LLaVA models: identity at init, equality with PEFT's RoAd."""

from __future__ import annotations

import pytest
import torch

from road_vlm.adapters import AdapterConfig, add_adapter, per_sample_adapters, set_active_adapter


ALL_VARIANTS = ["road1", "road2", "road4", "lora", "road1_lora"]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_new_adapter_is_identity_for_every_variant(tiny_llava, variant, adx):
    inputs = adx.make_inputs()
    with torch.no_grad():
        before = tiny_llava(**inputs).logits
        add_adapter(tiny_llava, AdapterConfig(variant=variant, group_size=adx.GROUP, lora_r=4, lora_alpha=8))
        after = tiny_llava(**inputs).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("variant", ["road1", "road2", "road4"])
def test_forward_matches_peft_road(fresh_tiny, variant, adx):
    ours = fresh_tiny()
    add_adapter(ours, AdapterConfig(variant=variant, group_size=adx.GROUP))
    adx.randomize_adapter(ours, "default", seed=3)
    twin = adx.peft_twin(fresh_tiny(), ours, ["default"], [variant], adx.GROUP)
    inputs = adx.make_inputs()
    with torch.no_grad():
        base = fresh_tiny()(**inputs).logits
        ours_out = ours(**inputs).logits
        peft_out = twin(**inputs).logits
    assert not torch.allclose(ours_out, base, atol=1e-3)  # the adapter really changes the output
    torch.testing.assert_close(ours_out, peft_out, rtol=0, atol=1e-5)


def test_mixed_batch_matches_peft_adapter_names(fresh_tiny, adx):
    ours = fresh_tiny()
    variants = {"r1": "road1", "r2": "road2", "r4": "road4"}
    for i, (name, variant) in enumerate(variants.items()):
        add_adapter(ours, AdapterConfig(variant=variant, group_size=adx.GROUP), name=name)
        adx.randomize_adapter(ours, name, seed=10 + i)
    twin = adx.peft_twin(fresh_tiny(), ours, list(variants), list(variants.values()), adx.GROUP)
    inputs = adx.make_inputs(batch=5)
    names = ["r4", None, "r1", "r2", "r4"]
    with torch.no_grad():
        with per_sample_adapters(ours, names):
            ours_out = ours(**inputs).logits
        peft_out = twin(**inputs, adapter_names=[n or "__base__" for n in names]).logits
    torch.testing.assert_close(ours_out, peft_out, rtol=0, atol=1e-5)


def test_set_active_adapter_switches_and_none_is_base(fresh_tiny, adx):
    model = fresh_tiny()
    inputs = adx.make_inputs()
    with torch.no_grad():
        base = model(**inputs).logits
    add_adapter(model, AdapterConfig(variant="road4", group_size=adx.GROUP), name="a")
    add_adapter(model, AdapterConfig(variant="road2", group_size=adx.GROUP), name="b")
    adx.randomize_adapter(model, "a", 1)
    adx.randomize_adapter(model, "b", 2)
    with torch.no_grad():
        set_active_adapter(model, "a")
        out_a = model(**inputs).logits
        set_active_adapter(model, "b")
        out_b = model(**inputs).logits
        set_active_adapter(model, None)
        out_none = model(**inputs).logits
    assert torch.equal(out_none, base)
    assert not torch.allclose(out_a, out_b, atol=1e-3)


def test_bf16_base_keeps_fp32_adapter_parameters_and_tracks_fp32_result(fresh_tiny, adx):
    model = fresh_tiny().to(torch.bfloat16)
    add_adapter(model, AdapterConfig(variant="road1_lora", group_size=adx.GROUP, lora_r=4, lora_alpha=8))
    adx.randomize_adapter(model, "default", 4)
    ref = fresh_tiny()
    add_adapter(ref, AdapterConfig(variant="road1_lora", group_size=adx.GROUP, lora_r=4, lora_alpha=8))
    adx.randomize_adapter(ref, "default", 4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    inputs = adx.make_inputs(with_image=False)
    with torch.no_grad():
        low = model(**inputs).logits.float()
        high = ref(**inputs).logits
    assert (low - high).abs().max() < 0.1 * high.abs().max()
