"""LLaVA's parameter groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from road_vlm.train.optim import build_optimizer, build_scheduler, lr_lambda, param_groups, warmup_steps


@pytest.fixture()
def adapted_model(tiny_llava_dir):
    from road_vlm.adapters import AdapterConfig, add_adapter
    from road_vlm.model import load_base

    model, _ = load_base(tiny_llava_dir)
    add_adapter(model, AdapterConfig(variant="road1_lora", group_size=64, lora_r=4, lora_alpha=8,
                                     train_projector=True))
    return model


def test_four_groups_with_projector_lr_and_no_decay_for_biases(adapted_model):
    groups = param_groups(adapted_model, learning_rate=2e-3, projector_lr=2e-5, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"adapter_decay", "projector_decay", "projector_no_decay"}
    assert by_name["projector_decay"]["lr"] == 2e-5 and by_name["projector_no_decay"]["lr"] == 2e-5
    assert by_name["adapter_decay"]["lr"] == 2e-3 and by_name["adapter_decay"]["weight_decay"] == 0.1
    assert by_name["projector_no_decay"]["weight_decay"] == 0.0
    proj = adapted_model.model.multi_modal_projector
    ids = lambda name: {id(p) for p in by_name[name]["params"]}  # noqa: E731
    assert ids("projector_no_decay") == {id(proj.linear_1.bias), id(proj.linear_2.bias)}
    assert ids("projector_decay") == {id(proj.linear_1.weight), id(proj.linear_2.weight)}
    grouped = set().union(*(ids(n) for n in by_name))
    trainable = {id(p) for p in adapted_model.parameters() if p.requires_grad}
    assert grouped == trainable  # every trainable parameter exactly once, nothing frozen
    assert not any(p.requires_grad for p in adapted_model.model.vision_tower.parameters())


def test_frozen_projector_gives_only_adapter_groups(tiny_llava_dir):
    from road_vlm.adapters import AdapterConfig, add_adapter
    from road_vlm.model import load_base

    model, _ = load_base(tiny_llava_dir)
    add_adapter(model, AdapterConfig(variant="road4", group_size=64))
    groups = param_groups(model, learning_rate=1e-3, projector_lr=2e-5, weight_decay=0.0)
    assert {g["name"] for g in groups} <= {"adapter_decay", "adapter_no_decay"}


def test_warmup_then_cosine_to_zero_for_every_group(adapted_model):
    groups = param_groups(adapted_model, learning_rate=1e-3, projector_lr=1e-4, weight_decay=0.0)
    opt = build_optimizer(groups, betas=(0.9, 0.999), eps=1e-8, cpu_offload=False)
    total = 100
    warm = warmup_steps(0.03, total)
    assert warm == 3  # ceil, as HF
    sched = build_scheduler(opt, kind="cosine", warmup=warm, total_steps=total)
    seen = []
    for _ in range(total):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == [0.0] * len(groups)
    peak = seen[warm]
    assert peak == [1e-4 if g["name"].startswith("projector") else 1e-3 for g in groups]
    step = 50
    assert seen[step][0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm))))
    assert all(a >= b for a, b in zip([s[0] for s in seen[warm:]], [s[0] for s in seen[warm + 1:]]))
    assert lr_lambda("cosine", warm, total)(total) == pytest.approx(0.0)
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5) and lr_lambda("constant", 2, 10)(9) == 1.0


def test_no_trainable_parameters_is_an_error():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(model, learning_rate=1e-3, projector_lr=1e-3, weight_decay=0.0)
