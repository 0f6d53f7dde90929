"""The training loss: mean token cross-entropy over the supervised tokens of a batch, and the forward it runs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from road_vlm.data.template import IGNORE_INDEX
from road_vlm.train.stand_in import STAND_IN


def compute_loss(
    engine: Any, batch: dict[str, Any], *, pixel_dtype: torch.dtype, train_projector: bool = False,
    run_vision: bool = False,
) -> torch.Tensor:
    """Mean token cross-entropy over supervised tokens (0, not NaN, for a batch with none)."""
    outputs = model_forward(engine, batch, pixel_dtype=pixel_dtype, train_projector=train_projector,
                            run_vision=run_vision)
    logits = outputs.logits[:, :-1, :]
    labels = batch["labels"][:, 1:].to(engine.device)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return loss_sum / count


def model_forward(
    engine: Any, batch: dict[str, Any], *, pixel_dtype: torch.dtype, train_projector: bool = False,
    run_vision: bool = False, hidden_states: bool = False,
) -> Any:
    """The model's outputs on a training batch (``hidden_states``: with every layer's hidden states).

    An all-text batch runs a zero-weighted stand-in image pass (``road_vlm.train.stand_in``, installed on the
    engine's module) when the projector trains or when ``run_vision`` says another rank's micro-batch has
    images (ZeRO-3), so every rank runs the same modules in the same order. The outputs are unchanged.
    """
    device = engine.device
    pixel_values = batch["pixel_values"]
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device)}
    if pixel_values is None and (train_projector or run_vision):
        inputs[STAND_IN] = "vision" if run_vision else "projector"
    if hidden_states:
        inputs["output_hidden_states"] = True
    return engine(
        **inputs,
        attention_mask=batch["attention_mask"].to(device),
        pixel_values=None if pixel_values is None else pixel_values.to(device, pixel_dtype),
        use_cache=False,
    )
