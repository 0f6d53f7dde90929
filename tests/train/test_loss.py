"""The training loss: supervised-token mean, and the projector kept in the graph for all-text batches."""

from __future__ import annotations

import torch

from road_vlm.data.template import IGNORE_INDEX


class _Engine:
    device = torch.device("cpu")

    def __init__(self, model):
        self.model = self.module = model  # DeepSpeedEngine exposes the wrapped model as .module

    def __call__(self, **kw):
        return self.model(**kw)


def _model(tiny_llava_dir):
    from road_vlm.adapters import AdapterConfig, add_adapter
    from road_vlm.model import load_base

    from road_vlm.train.stand_in import install_stand_in

    model, _ = load_base(tiny_llava_dir)
    add_adapter(model, AdapterConfig(variant="road4", group_size=64, train_projector=True))
    install_stand_in(model)  # as the trainer does on the engine's module
    model.train()
    return model


def test_all_text_batch_still_gives_the_projector_a_gradient(tiny_llava_dir):
    from road_vlm.train.loss import compute_loss

    model = _model(tiny_llava_dir)
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": None,
             "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 60, 70, 2]])}
    proj = model.model.multi_modal_projector
    loss = compute_loss(_Engine(model), batch, train_projector=True, pixel_dtype=torch.float32)
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in proj.parameters())
    # The dummy pass is weighted 0: the loss is exactly the mean CE of the 3 supervised tokens.
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    expected = torch.nn.functional.cross_entropy(logits[0, 1:4], torch.tensor([60, 70, 2]))
    assert torch.allclose(loss.detach(), expected, atol=1e-6)


def test_batch_without_supervised_tokens_has_zero_loss_not_nan(tiny_llava_dir):
    from road_vlm.train.loss import compute_loss

    model = _model(tiny_llava_dir)
    ids = torch.tensor([[1, 50, 60]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": None,
             "labels": torch.full_like(ids, IGNORE_INDEX)}
    loss = compute_loss(_Engine(model), batch, pixel_dtype=torch.float32)
    assert loss.item() == 0.0


def test_gradient_checkpointing_with_frozen_embeddings_still_trains_the_adapter(tiny_llava_dir):
    from road_vlm.train.config import config_from_dict
    from road_vlm.train.loss import compute_loss
    from road_vlm.train.model_setup import load_model_with_adapter

    config = config_from_dict({"model": {"name_or_path": str(tiny_llava_dir)}, "data": {"path": "x.json"},
                               "output": {"dir": "o"}, "adapter": {"variant": "road4", "group_size": 64},
                               "train": {"gradient_checkpointing": True}})
    model, _, _ = load_model_with_adapter(config)
    assert model.training and model.model.language_model.gradient_checkpointing
    assert not model.get_input_embeddings().weight.requires_grad
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": None, "labels": ids.clone()}
    compute_loss(_Engine(model), batch, pixel_dtype=torch.float32).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def _grad_arrival_order(model, batch, run_vision: bool = False) -> list[str]:
    """Names of the trainable parameters in the order their gradients are finished during backward."""
    from road_vlm.train.loss import compute_loss

    order: list[str] = []
    handles = [p.register_post_accumulate_grad_hook(lambda _p, name=name: order.append(name))
               for name, p in model.named_parameters() if p.requires_grad]
    try:
        loss = compute_loss(_Engine(model), batch, train_projector=True, pixel_dtype=torch.float32, run_vision=run_vision)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return order


def _image_and_text_batches(model):
    n_image = 16  # tiny fixture: 32 px, 8 px patches
    ids = torch.tensor([[1] + [model.config.image_token_index] * n_image + [50, 60, 70, 2]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -3:] = ids[0, -3:]
    image_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                   "pixel_values": torch.randn(1, 3, 32, 32)}
    text_ids = torch.tensor([[1, 50, 60, 70, 2]])
    text_batch = {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids), "pixel_values": None,
                  "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 60, 70, 2]])}
    return image_batch, text_batch


def _module_call_order(model, batch, **kwargs) -> list[str]:
    """Names of the modules in the order their forward starts (what ZeRO-3 gathers parameters by)."""
    from road_vlm.train.loss import compute_loss

    order: list[str] = []
    # prepend: DeepSpeed's hooks are registered before the stand-in's (which comes after deepspeed.initialize).
    handles = [m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name), prepend=True)
               for name, m in model.named_modules() if name]
    try:
        compute_loss(_Engine(model), batch, pixel_dtype=torch.float32, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def test_text_batch_with_run_vision_runs_the_modules_of_an_image_batch_in_the_same_order(tiny_llava_dir):
    # ZeRO-3: a rank on an all-text micro-batch while another rank has images must gather the same parameters
    # in the same order (seen: gloo "Received data size doesn't match expected size" at the last step).
    model = _model(tiny_llava_dir)
    image_batch, text_batch = _image_and_text_batches(model)
    image_order = _module_call_order(model, image_batch, train_projector=True)
    assert any(name.startswith("model.vision_tower") for name in image_order)
    assert _module_call_order(model, text_batch, train_projector=True, run_vision=True) == image_order
    # Without run_vision (ZeRO-0/1/2, or no rank has an image) the vision tower is not paid for.
    assert not any(name.startswith("model.vision_tower")
                   for name in _module_call_order(model, text_batch, train_projector=True))


def test_stand_in_image_pass_leaves_the_loss_of_a_text_batch_unchanged(tiny_llava_dir):
    from road_vlm.train.loss import compute_loss

    model = _model(tiny_llava_dir).eval()  # no dropout: compare exactly
    _, text_batch = _image_and_text_batches(model)
    with torch.no_grad():
        plain = compute_loss(_Engine(model), text_batch, pixel_dtype=torch.float32)
        for kwargs in ({"train_projector": True}, {"run_vision": True}, {"train_projector": True, "run_vision": True}):
            assert compute_loss(_Engine(model), text_batch, pixel_dtype=torch.float32, **kwargs).item() == plain.item()


def test_stand_in_refuses_a_batch_that_has_images(tiny_llava_dir):
    import pytest

    from road_vlm.train.stand_in import STAND_IN

    model = _model(tiny_llava_dir)
    image_batch, _ = _image_and_text_batches(model)
    with pytest.raises(ValueError, match="all-text batches"):
        model(input_ids=image_batch["input_ids"], pixel_values=image_batch["pixel_values"], **{STAND_IN: "vision"})


def test_text_and_image_batches_finish_gradients_in_the_same_order(tiny_llava_dir):
    # ZeRO reduces gradients in the order they are finished; with one rank on an all-text micro-batch and another
    # on an image batch, a different order aborts the run with a collective mismatch (seen with 2 ranks, ZeRO-2).
    model = _model(tiny_llava_dir)
    image_batch, text_batch = _image_and_text_batches(model)
    image_order = _grad_arrival_order(model, image_batch)
    assert any("multi_modal_projector" in name for name in image_order)
    for run_vision in (False, True):
        text_order = _grad_arrival_order(model, text_batch, run_vision=run_vision)
        assert sorted(image_order) == sorted(text_order)
        assert text_order == image_order
