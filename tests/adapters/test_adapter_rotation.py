"""RoAd math on tensors and on a single adapted layer: PEFT's layout, row-wise merge, inverse, gradients."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.road.layer import _apply_road, _get_delta_weight
from torch import nn

from road_vlm.adapters import AdapterConfig, AdapterStateError
from road_vlm.adapters.config import PEFT_VARIANT
from road_vlm.adapters.layer import AdaptedLinear
from road_vlm.adapters.rotation import (
    apply_rotation,
    apply_rotation_exact_,
    invert_coefficients,
    road_coefficients,
    road_param_size,
    rotate_rows,
    singular_pairs,
)

G = 8
D_OUT = 32


def _random_params(variant: str, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    size = road_param_size(variant, D_OUT)
    theta = torch.randn(size, generator=gen, dtype=dtype)
    alpha = 1.0 + 0.3 * torch.randn(size, generator=gen, dtype=dtype)
    return theta, alpha


@pytest.mark.parametrize("variant", ["road1", "road2", "road4"])
def test_rotation_matches_peft_apply_and_dense_matrix(variant):
    theta, alpha = _random_params(variant)
    y = torch.randn(5, 3, D_OUT, dtype=torch.float64)
    c1, s2 = road_coefficients(variant, G, theta, alpha)
    peft_out = _apply_road(PEFT_VARIANT[variant], G, theta, alpha, y)
    dense = _get_delta_weight(PEFT_VARIANT[variant], G, theta, alpha)
    torch.testing.assert_close(apply_rotation(y, c1, s2, G), peft_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_rotation_exact_(y.clone(), c1, s2, G), peft_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(y @ dense.T, peft_out, rtol=0, atol=1e-12)


def test_pair_layout_is_j_with_j_plus_half_group():
    # road2 with theta = pi/2 on every element and alpha = 1: z_j = -y_k, z_k = y_j for k = j + G/2.
    theta = torch.full((D_OUT,), torch.pi / 2, dtype=torch.float64)
    alpha = torch.ones(D_OUT, dtype=torch.float64)
    c1, s2 = road_coefficients("road2", G, theta, alpha)
    y = torch.arange(D_OUT, dtype=torch.float64)
    z = apply_rotation(y, c1, s2, G)
    half = G // 2
    for j in range(half):
        assert z[j].item() == pytest.approx(-(j + half))
        assert z[j + half].item() == pytest.approx(j)


@pytest.mark.parametrize("variant", ["road1", "road2", "road4"])
def test_rotate_rows_equals_dense_product_and_inverse_undoes_it(variant):
    theta, alpha = _random_params(variant, seed=1)
    w = torch.randn(D_OUT, 12, dtype=torch.float64)
    c1, s2 = road_coefficients(variant, G, theta, alpha)
    dense = _get_delta_weight(PEFT_VARIANT[variant], G, theta, alpha)
    merged = rotate_rows(w, c1, s2, G)
    torch.testing.assert_close(merged, dense @ w, rtol=0, atol=1e-12)
    c1i, s2i, det = invert_coefficients(c1, s2, G)
    assert det.shape == (D_OUT // 2,)
    torch.testing.assert_close(rotate_rows(merged, c1i, s2i, G), w, rtol=0, atol=1e-10)
    assert singular_pairs(c1, s2, G).numel() == 0


def test_singular_pairs_found_for_zero_scale():
    theta, alpha = _random_params("road2", seed=2)
    alpha[3] = 0.0  # element 3 pairs with 3 + G/2 = 7; both rows of the block need a zero for det 0
    alpha[7] = 0.0
    c1, s2 = road_coefficients("road2", G, theta, alpha)
    assert singular_pairs(c1, s2, G).tolist() == [3]


def _layer(variant: str, dtype=torch.float64, seed: int = 0) -> AdaptedLinear:
    torch.manual_seed(seed)
    base = nn.Linear(10, 16, bias=True, dtype=dtype)
    layer = AdaptedLinear(base, "toy.proj")
    cfg = AdapterConfig(variant=variant, group_size=G, target_modules=["proj"], lora_r=3, lora_alpha=6,
                        lora_dropout=0.0)
    layer.add("a", cfg)
    layer.active_adapter = "a"
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for kind, p in layer.adapter_parameters("a").items():
            base_val = 1.0 if kind == "road_alpha" else 0.0
            p.copy_(base_val + 0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return layer.to(dtype)


@pytest.mark.parametrize("variant", ["road1", "road2", "road4", "lora", "road1_lora"])
def test_gradcheck_layer_float64(variant):
    layer = _layer(variant)
    params = layer.adapter_parameters("a")
    names = list(params)
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        override = {f"{kind}.a": v for kind, v in zip(names, values)}
        return torch.func.functional_call(layer, override, (x,))

    inputs = (x,) + tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_hybrid_layer_is_rotation_of_lora_output():
    layer = _layer("road1_lora")
    x = torch.randn(4, 10, dtype=torch.float64)
    p = layer.adapter_parameters("a")
    c1, s2 = road_coefficients("road1", G, p["road_theta"].detach(), p["road_alpha"].detach())
    inner = layer.base_layer(x) + 2.0 * (x @ p["lora_A"].T @ p["lora_B"].T)
    expected = apply_rotation(inner, c1, s2, G)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def _expected(layer, x):
    c1, s2 = road_coefficients("road2", G, layer.road_theta["a"].detach(), layer.road_alpha["a"].detach())
    return apply_rotation(layer.base_layer(x), c1, s2, G)


def test_coefficients_follow_in_place_updates_in_training_and_through_the_bank_in_eval():
    layer = _layer("road2")
    x = torch.randn(2, 10, dtype=torch.float64)
    with torch.no_grad():
        first = layer(x)
        layer.road_theta["a"].add_(0.25)  # like an optimizer step: training reads the live parameters
        second = layer(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, _expected(layer, x), rtol=0, atol=1e-12)

    layer.eval()  # eval() writes the bank from the stepped parameters
    with torch.no_grad():
        torch.testing.assert_close(layer(x), second, rtol=0, atol=0)
        layer.road_theta["a"].add_(0.25)  # an in-place edit in eval mode, then the documented call
        layer.refresh_coefficients("a")
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=0, atol=1e-12)
        layer.load_state_dict({k: v + 0.5 if k == "road_theta.a" else v for k, v in layer.state_dict().items()})
        torch.testing.assert_close(layer(x), _expected(layer, x), rtol=0, atol=1e-12)
    # With autograd recording, eval mode reads the parameters too (gradients reach them).
    layer(x).sum().backward()
    assert layer.road_theta["a"].grad is not None and layer.road_theta["a"].grad.abs().max() > 0


def test_unmerge_refuses_singular_block_and_names_layer():
    layer = _layer("road2")
    with torch.no_grad():
        layer.road_alpha["a"][2] = 0.0
        layer.road_alpha["a"][6] = 0.0
    w_before = layer.base_layer.weight.detach().clone()
    layer.merge("a")
    merged_w = layer.base_layer.weight.detach().clone()
    with pytest.raises(AdapterStateError, match=r"toy\.proj.*singular.*dims 2 and 6"):
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, merged_w)  # untouched by the refused unmerge
    assert not torch.equal(merged_w, w_before)


@pytest.mark.parametrize("block_bytes", [1, 3 * G * 9 * 8, 1 << 20, None])  # one group, 3 groups, all, default
def test_in_place_rotate_rows_matches_out_of_place(block_bytes):
    from road_vlm.adapters.rotation import rotate_rows_

    theta, alpha = _random_params("road4", seed=3)
    c1, s2 = road_coefficients("road4", G, theta, alpha)
    w = torch.randn(D_OUT, 9, dtype=torch.float64)
    expected = rotate_rows(w, c1, s2, G)
    got = rotate_rows_(w.clone(), c1, s2, G, block_bytes=block_bytes)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)


def test_blocked_cpu_rotation_is_bit_identical_for_large_activations():
    # 3 x 1100 x 1024 fp32 = 13.5 MB: above the blocking threshold; 1100 rows of 4 KiB span two 4 MiB blocks.
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 1100, 1024, generator=gen)
    c1 = torch.randn(3, 1, 1024, generator=gen)
    s2 = torch.randn(3, 1, 1024, generator=gen)
    exact = apply_rotation(y, c1, s2, 64)
    assert torch.equal(apply_rotation_exact_(y.clone(), c1, s2, 64), exact)
    from road_vlm.adapters.rotation import apply_rotation_fused_

    torch.testing.assert_close(apply_rotation_fused_(y.clone(), c1, s2, 64), exact, rtol=1e-6, atol=1e-6)
    small = y[:, :2].clone()  # below the blocking threshold
    torch.testing.assert_close(apply_rotation_fused_(small, c1, s2, 64), exact[:, :2], rtol=1e-6, atol=1e-6)
