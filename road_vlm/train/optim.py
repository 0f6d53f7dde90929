"""LLaVA's optimizer parameter groups and the HF-style warmup + cosine/linear/constant schedule."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from torch import nn

PROJECTOR_KEYS = ("multi_modal_projector", "mm_projector")
_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm,)


def _norm_types() -> tuple[type, ...]:
    types: list[type] = list(_NORM_TYPES)
    try:  # transformers' RMSNorm classes are LayerNorm-type for the decay split (HF's ALL_LAYERNORM_LAYERS)
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        types.append(LlamaRMSNorm)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_projector_param(name: str) -> bool:
    return any(key in name for key in PROJECTOR_KEYS)


def param_groups(
    model: nn.Module, *, learning_rate: float, projector_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Up to 4 groups as LLaVA's ``create_optimizer`` (llava15.md 1.4): {adapter, projector} x {decay, no decay}.

    Decay applies to trainable parameters outside norm layers whose name has no ``bias``. Empty groups are left
    out (DeepSpeed rejects empty groups). Every group carries a ``name`` for logging.
    """
    norm_types = _norm_types()
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, norm_types):
            for pname, _ in module.named_parameters(recurse=False):
                no_decay.add(f"{module_name}.{pname}" if module_name else pname)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = name not in no_decay and "bias" not in name
        buckets.setdefault((is_projector_param(name), decay), []).append(param)
    groups = []
    for (projector, decay), params in sorted(buckets.items()):
        groups.append({
            "name": f"{'projector' if projector else 'adapter'}_{'decay' if decay else 'no_decay'}",
            "params": params,
            "lr": projector_lr if projector else learning_rate,
            "weight_decay": weight_decay if decay else 0.0,
        })
    if not groups:
        raise ValueError("the model has no trainable parameters (did add_adapter run?)")
    return groups


LrScheduler = Literal["cosine", "linear", "constant"]  # each after a linear warmup
LR_SCHEDULERS: tuple[str, ...] = get_args(LrScheduler)


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of each group's own lr at a step (transformers' get_*_schedule_with_warmup shapes)."""
    if kind not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {kind!r}; use one of {', '.join(LR_SCHEDULERS)}")

    def fn(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        if kind == "constant":
            return 1.0
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return fn


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """HF rounds the warmup up: ceil(ratio * total)."""
    return math.ceil(warmup_ratio * total_steps)


def build_optimizer(groups: list[dict[str, Any]], *, betas: tuple[float, float], eps: float, cpu_offload: bool):
    """torch AdamW, or DeepSpeedCPUAdam (AdamW mode) when ZeRO offloads the optimizer to CPU."""
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=betas, eps=eps, adamw_mode=True)
    return torch.optim.AdamW(groups, betas=betas, eps=eps)


def build_scheduler(optimizer: Any, *, kind: str, warmup: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup, total_steps))
