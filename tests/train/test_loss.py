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

    model, _ = load_base(tiny_llava_dir)
    add_adapter(model, AdapterConfig(variant="road4", group_size=64, train_projector=True))
    model.train()
    return model


def test_all_text_batch_still_gives_the_projector_a_gradient(tiny_llava_dir):
    from road_vlm.train.trainer import compute_loss

    model = _model(tiny_llava_dir)
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": None,
             "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 60, 70, 2]])}
    proj = model.model.multi_modal_projector
    loss = compute_loss(_Engine(model), batch, projector=proj, pixel_dtype=torch.float32)
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in proj.parameters())
    # The dummy pass is weighted 0: the loss is exactly the mean CE of the 3 supervised tokens.
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    expected = torch.nn.functional.cross_entropy(logits[0, 1:4], torch.tensor([60, 70, 2]))
    assert torch.allclose(loss.detach(), expected, atol=1e-6)


def test_batch_without_supervised_tokens_has_zero_loss_not_nan(tiny_llava_dir):
    from road_vlm.train.trainer import compute_loss

    model = _model(tiny_llava_dir)
    ids = torch.tensor([[1, 50, 60]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": None,
             "labels": torch.full_like(ids, IGNORE_INDEX)}
    loss = compute_loss(_Engine(model), batch, projector=None, pixel_dtype=torch.float32)
    assert loss.item() == 0.0


def test_gradient_checkpointing_with_frozen_embeddings_still_trains_the_adapter(tiny_llava_dir):
    from road_vlm.train.config import config_from_dict
    from road_vlm.train.trainer import compute_loss, load_model_with_adapter

    config = config_from_dict({"model": {"name_or_path": str(tiny_llava_dir)}, "data": {"path": "x.json"},
                               "output": {"dir": "o"}, "adapter": {"variant": "road4", "group_size": 64},
                               "train": {"gradient_checkpointing": True}})
    model, _ = load_model_with_adapter(config)
    assert model.training and model.model.language_model.gradient_checkpointing
    assert not model.get_input_embeddings().weight.requires_grad
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": None, "labels": ids.clone()}
    compute_loss(_Engine(model), batch, projector=None, pixel_dtype=torch.float32).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
