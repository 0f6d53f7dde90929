"""The model a run trains: the base LLaVA checkpoint (partitioned under ZeRO-3, quantized if asked) with a fresh
adapter, everything but the adapter (and the projector when configured) frozen."""

from __future__ import annotations

from typing import Any

import torch

from road_vlm.quantization import Quantization, prepare_kbit_training
from road_vlm.train.checkpoint import exclude_quantized_state
from road_vlm.train.composition import Composition, attach_composed_adapters
from road_vlm.train.config import ConfigError, TrainingConfig
from road_vlm.train.ds_config import zero3_partitioned_loading

ADAPTER_NAME = "default"


def model_dtype(config: TrainingConfig) -> str:
    """``model.dtype``, with ``auto`` resolved from the training precision."""
    if config.model.dtype != "auto":
        return config.model.dtype
    if config.train.bf16:
        return "bfloat16"
    if config.train.fp16:
        return "float16"
    return "float32"


def text_hidden_size(name_or_path: str) -> int:
    """The language model's hidden size from the checkpoint's config (DeepSpeed's bucket sizes need it before
    the model is built)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(name_or_path, trust_remote_code=False).text_config.hidden_size)


def load_model_with_adapter(config: TrainingConfig, device: str | torch.device = "cpu",
                            zero3_config: dict[str, Any] | None = None) -> tuple[Any, Any, Composition | None]:
    """Base LLaVA + a fresh adapter (or a composed run's adapters: ``composition.py``); vision tower and all base
    weights frozen, projector per the config. Returns the model, its processor and the composition (or None).

    ``zero3_config``: the DeepSpeed ZeRO-3 config; the base is then constructed and loaded partitioned
    (``zero3_partitioned_loading``), and the adapter is attached to the partitioned model.
    """
    from transformers import AutoConfig

    from road_vlm.adapters import AdapterConfigError, add_adapter
    from road_vlm.model import load_base

    model_config = (AutoConfig.from_pretrained(config.model.name_or_path, trust_remote_code=False)
                    if zero3_config is not None else None)
    quantization = Quantization(config.model.quantization, config.model.double_quant)
    with zero3_partitioned_loading(zero3_config, model_config):
        model, processor = load_base(config.model.name_or_path, device=device, dtype=model_dtype(config),
                                     quantization=quantization)
    if quantization.enabled:
        prepare_kbit_training(model)
        exclude_quantized_state(model)
    model.config.use_cache = False
    composition = None
    try:
        if config.compose.enabled:
            composition = attach_composed_adapters(model, config)
        else:
            add_adapter(model, config.adapter, name=ADAPTER_NAME)
    except AdapterConfigError as err:
        raise ConfigError(f"adapter section does not fit {config.model.name_or_path}: {err}") from err
    vision = model.model.vision_tower
    if any(p.requires_grad for p in vision.parameters()):  # pragma: no cover - add_adapter contract
        raise RuntimeError("the vision tower must be frozen")
    if config.train.gradient_checkpointing:
        # transformers 5.x renamed gradient_checkpointing_enable (deprecated, removed in v6); support both.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # pragma: no cover - older transformers
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The embeddings are frozen; make their output require grad so checkpointed blocks still backprop
        # (needed with reentrant checkpointing, harmless without: what LLaVA does).
        model.enable_input_require_grads()
    model.train()
    return model, processor, composition
