"""Pair subsets and composition: masked pairs stay identity, disjoint adapters compose exactly (R_C = R_A R_B)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from road_vlm.adapters import (
    AdapterConfig,
    AdapterConfigError,
    add_adapter,
    adapted_layers,
    load_adapter,
    merge_adapter,
    per_sample_adapters,
    read_adapter_config,
    save_adapter,
    unload_adapters,
)
from road_vlm.adapters.compose import CompositionError, compose_dirs, compose_loaded
from road_vlm.adapters.pairs import PairSubset, pair_dims, union

ROAD = ("road1", "road2", "road4")


def _config(variant: str, subset: str | None, **kw) -> AdapterConfig:
    return AdapterConfig(variant=variant, group_size=16, lora_r=4, lora_alpha=8.0, pair_subset=subset, **kw)


def _saved(adx, tmp_path, name: str, variant: str, subset: str | None, seed: int, **kw):
    model = adx.build_tiny()
    add_adapter(model, _config(variant, subset, **kw), name)
    adx.randomize_adapter(model, name, seed)
    return save_adapter(model, tmp_path / name, name)


def test_pair_subsets_parse_to_a_canonical_form_and_refuse_nonsense():
    assert str(PairSubset.parse("3,1/4")) == "1,3/4"
    assert PairSubset.parse("1/2").pair_mask(6).tolist() == [True, False, True, False, True, False]
    assert PairSubset.parse("2/2", "contiguous").pair_mask(6).tolist() == [False] * 3 + [True] * 3
    assert str(union([PairSubset.parse("1/2"), PairSubset.parse("2/4")])) == "1,2,3/4"
    assert union([PairSubset.parse("1/2"), PairSubset.parse("2/2")]) is None
    for bad, why in [("0/2", "count from 1"), ("1/1", "at least 2"), ("1,2/2", "every slice"), ("a/2", "integers"),
                     ("1-2", "k/n")]:
        with pytest.raises(AdapterConfigError, match=why):
            PairSubset.parse(bad)
    with pytest.raises(AdapterConfigError, match="variant 'lora' has none"):
        AdapterConfig(variant="lora", pair_subset="1/2")
    assert AdapterConfig(pair_subset="2,1/4").pair_subset == "1,2/4"


@pytest.mark.parametrize("variant", ROAD + ("road1_lora",))
def test_masked_pairs_stay_identity_through_training_steps(adx, tmp_path, variant):
    model = adx.build_tiny()
    add_adapter(model, _config(variant, "2/3", lora_dropout=0.0), "a")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay pulls the raw alpha of *every* entry towards 0: masking must make that irrelevant.
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)
    batch = adx.make_inputs(batch=2, seed=1)
    for _ in range(3):
        opt.zero_grad()
        model(**batch).logits.pow(2).mean().backward()
        for layer in adapted_layers(model).values():
            mask = layer.pair_masks["a"]
            for p in (layer.road_theta["a"], layer.road_alpha["a"]):
                assert p.grad[~mask].abs().max() == 0 and p.grad[mask].abs().max() > 0
        opt.step()
    model.eval()
    subset = PairSubset.parse("2/3")
    captured = {}
    layer_name, layer = next(iter(adapted_layers(model).items()))
    layer.register_forward_hook(lambda m, i, o: captured.update(x=i[0], y=o))
    with torch.no_grad():
        model(**batch)
        base_y = layer.base_layer(captured["x"])
    owned = subset.pair_mask(layer.out_features // 2)
    dims = torch.zeros(layer.out_features, dtype=torch.bool)
    for p in owned.nonzero().flatten().tolist():
        dims[list(pair_dims(p, 16))] = True
    if variant == "road1_lora":  # the LoRA part is not restricted: compare the rotation only
        c1, s2 = layer.coefficients("a")
        assert torch.equal(c1[~dims], torch.ones_like(c1[~dims])) and not s2[~dims].any()
    else:
        assert torch.equal(captured["y"][..., ~dims], base_y[..., ~dims]), layer_name
        assert not torch.allclose(captured["y"][..., dims], base_y[..., dims])

    out = save_adapter(model, tmp_path / "a", "a")
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata()["road_vlm.pair_subset"] == "2/3"
        theta = f.get_tensor(f"base_model.model.{layer_name}.road_theta")
        alpha = f.get_tensor(f"base_model.model.{layer_name}.road_alpha")
    mask = layer.pair_masks["a"]
    assert not theta[~mask].any() and torch.equal(alpha[~mask], torch.ones_like(alpha[~mask]))
    assert read_adapter_config(out).pair_subset == "2/3"
    reloaded = adx.build_tiny()
    load_adapter(reloaded, out, "a")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ROAD)
def test_composed_adapter_equals_applying_a_then_b(adx, tmp_path, variant):
    a = _saved(adx, tmp_path, "a", variant, "1/2", seed=1)
    b = _saved(adx, tmp_path, "b", variant, "2/2", seed=2)
    composed = compose_dirs([a, b], tmp_path / "ab")
    assert read_adapter_config(composed).pair_subset is None  # 1/2 + 2/2 = every pair

    inputs = adx.make_inputs(seed=3)
    model = adx.build_tiny()
    load_adapter(model, composed, "ab")
    # Reference: fold A into the base weights (W' = R_A W), then apply B on top: R_B R_A W h.
    ref = adx.build_tiny()
    load_adapter(ref, a, "a")
    merge_adapter(ref, "a")
    unload_adapters(ref)
    load_adapter(ref, b, "b")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, rtol=1e-5, atol=1e-5)
        # And it differs from either part alone (both matter).
        alone = adx.build_tiny()
        load_adapter(alone, a, "a")
        assert not torch.allclose(alone(**inputs).logits, model(**inputs).logits, atol=1e-3)

    # The composed directory is a PEFT RoAd adapter like any other.
    peft = PeftModel.from_pretrained(adx.build_tiny(), str(composed)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_three_way_composition_keeps_the_union_recorded(adx, tmp_path):
    dirs = [_saved(adx, tmp_path, f"p{k}", "road4", f"{k}/4", seed=k) for k in (1, 2, 4)]
    out = compose_dirs(dirs, tmp_path / "c")
    assert read_adapter_config(out).pair_subset == "1,2,4/4"
    again = compose_dirs([out, _saved(adx, tmp_path, "p3", "road4", "3/4", seed=3)], tmp_path / "all")
    assert read_adapter_config(again).pair_subset is None
    assert json.loads((out / "composed_from.json").read_text())["pair_subset"] == "1,2,4/4"


def test_overlap_names_the_first_layer_and_pair(adx, tmp_path):
    a = _saved(adx, tmp_path, "a", "road2", "1/2", seed=1)
    b = _saved(adx, tmp_path, "b", "road2", "1/4", seed=2)
    with pytest.raises(CompositionError, match=r"overlap: layer model\.language_model\.layers\.0\.\S+, pair 0 "
                                               r"\(output dims 0 and 8\)"):
        compose_dirs([a, b], tmp_path / "ab")
    assert not (tmp_path / "ab").exists()


@pytest.mark.parametrize("second, why", [
    (dict(variant="road4", subset="2/2", train_projector=True), "each trained the projector"),
    (dict(variant="road1_lora", subset="2/2"), "LoRA update B A is dense"),
    (dict(variant="road2", subset=None), "trained on every pair"),
    (dict(variant="road2", subset="2/2"), "differ in variant"),
    (dict(variant="road4", subset="2/2", pair_layout="contiguous"), "differ in pair_layout"),
])
def test_conflicts_are_clear_errors(adx, tmp_path, second, why):
    a = _saved(adx, tmp_path, "a", "road4", "1/2", seed=1, train_projector=True)
    extra = {k: v for k, v in second.items() if k not in ("variant", "subset")}
    b = _saved(adx, tmp_path, "b", second["variant"], second["subset"], seed=2, **extra)
    with pytest.raises(CompositionError, match=why):
        compose_dirs([a, b], tmp_path / "ab")


def test_different_recorded_bases_are_refused_unless_told(adx, tmp_path):
    a = _saved(adx, tmp_path, "a", "road4", "1/2", seed=1)
    b = _saved(adx, tmp_path, "b", "road4", "2/2", seed=2)
    for d, base in ((a, "bases/one"), (b, "bases/two")):
        raw = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**raw, "base_model_name_or_path": base}))
    with pytest.raises(CompositionError, match="different bases"):
        compose_dirs([a, b], tmp_path / "ab")
    compose_dirs([a, b], tmp_path / "ab", ignore_base_name=True)


def test_composition_in_a_loaded_model_equals_the_composed_directory_in_a_mixed_batch(adx, tmp_path):
    a = _saved(adx, tmp_path, "a", "road4", "1/2", seed=1)
    b = _saved(adx, tmp_path, "b", "road4", "2/2", seed=2)
    composed = compose_dirs([a, b], tmp_path / "ab")
    inputs = adx.make_inputs(batch=3, seed=4)

    model = adx.build_tiny().eval()
    load_adapter(model, a, "a")
    load_adapter(model, b, "b")
    assert compose_loaded(model, ["a", "b"]) == "a+b"
    assert compose_loaded(model, ["a", "b"]) == "a+b"  # reused, not rebuilt
    with torch.no_grad(), per_sample_adapters(model, ["a+b", "a", None]):
        mixed = model(**inputs).logits
    for row, (directory, name) in enumerate([(composed, "ab"), (a, "a"), (None, None)]):
        solo = adx.build_tiny().eval()
        if directory is not None:
            load_adapter(solo, directory, name)
        with torch.no_grad():
            expected = solo(**{k: v[row:row + 1] for k, v in inputs.items()}).logits
        torch.testing.assert_close(mixed[row:row + 1], expected, rtol=1e-5, atol=1e-5)
    composed_params = [p for layer in adapted_layers(model).values() for p in layer.adapter_parameters("a+b").values()]
    assert composed_params and not any(p.requires_grad for p in composed_params)
    with pytest.raises(CompositionError, match="not loaded"):
        compose_loaded(model, ["a", "zzz"])
