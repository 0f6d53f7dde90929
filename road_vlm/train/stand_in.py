"""A zero-weighted stand-in for the image pass of an all-text micro-batch, run *inside* the model's forward.

Why it exists. Every rank of a distributed run must run the same modules in the same order:
- ZeRO-0/1/2 reduce gradients in the order they arrive; a trained projector that gets no gradient on one rank
  (all-text batch) while another rank's images give it one leaves the ranks waiting on different buckets.
- ZeRO-3 all-gathers each module's parameters when it runs and checks, once per forward, that every rank
  recorded the same module order. A rank that skips the vision tower while another runs it deadlocks (NCCL) or
  aborts with a collective size mismatch (gloo).

LLaVA's answer is a zero image for text-only samples and a zero-length slice of its features. Here: the
input embeddings plus ``0 * sum(features)``, where the features come from the projector alone on one zero
feature (``"projector"``: enough for ZeRO-0/1/2, and for ZeRO-3 when no rank has an image) or from the vision
tower and projector on one zero image (``"vision"``: ZeRO-3 when some rank has an image). The loss is unchanged
and the text-only prompt keeps no image tokens. It joins where real image features join, in HF LLaVA's module
order (embeddings, vision tower, projector, language model), so gradients arrive in the same order too.

It must run inside the forward (ZeRO-3 traces the module order of each forward from DeepSpeed's start-of-forward
hook on), so it is a forward pre-hook, installed after ``deepspeed.initialize``; callers ask for it with the
keyword ``STAND_IN`` in the forward call.
"""

from __future__ import annotations

from typing import Any

import torch

STAND_IN = "road_vlm_stand_in"
KINDS = ("projector", "vision")


def _features(llava: Any, kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if kind == "projector":
        projector = llava.multi_modal_projector
        return projector(torch.zeros(1, 1, projector.linear_1.in_features, device=device, dtype=dtype))
    size = llava.config.vision_config.image_size
    out = llava.get_image_features(
        pixel_values=torch.zeros(1, 3, size, size, device=device, dtype=dtype),
        vision_feature_layer=llava.config.vision_feature_layer,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
    )
    features = getattr(out, "pooler_output", out)  # newer transformers wrap the per-image list in an output
    return torch.stack(list(features))


def _pre_forward(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    kind = kwargs.pop(STAND_IN, None)
    if kind is None:
        return args, kwargs
    if kind not in KINDS:
        raise ValueError(f"{STAND_IN} must be one of {KINDS}, got {kind!r}")
    if kwargs.get("pixel_values") is not None:
        raise ValueError(f"{STAND_IN} is for all-text batches; this batch has pixel_values")
    embeds = module.get_input_embeddings()(kwargs.pop("input_ids"))
    dtype = next(module.vision_tower.parameters()).dtype
    features = _features(module, kind, embeds.device, dtype)
    kwargs["inputs_embeds"] = embeds + 0.0 * features.sum().to(embeds.dtype)
    return args, kwargs


def install_stand_in(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Let ``model(..., road_vlm_stand_in=kind)`` (a ``LlavaForConditionalGeneration``) run the stand-in pass.

    The hook sits on the inner ``LlavaModel``, which HF LLaVA's forward enters before it embeds the tokens and
    runs the vision tower: the stand-in then runs the modules an image batch runs, in the same order (the outer
    forward hands unknown keywords through to it).
    """
    return model.model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
