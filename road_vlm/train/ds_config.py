"""Turn a LLaVA-style DeepSpeed JSON (with ``"auto"`` values) into the dict passed to ``deepspeed.initialize``.

``"auto"`` values are filled from the training config the way transformers' ``HfTrainerDeepSpeedConfig`` does
(micro batch, accumulation, global batch, bf16/fp16, gradient clipping, ZeRO bucket sizes from the hidden size).

``optimizer`` / ``scheduler`` sections (zero3_offload.json has both) are removed with a logged notice: with them
DeepSpeed builds one AdamW over all parameters and a WarmupLR schedule (constant after warmup), which silently
drops the projector's own learning rate and the cosine decay (llava15.md 1.4). road_vlm always builds its own
4-group AdamW (DeepSpeedCPUAdam when the optimizer is offloaded to CPU) and warmup+cosine schedule instead.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from road_vlm.quantization import FP32_NORMS
from road_vlm.train.config import TrainingConfig

logger = logging.getLogger(__name__)


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON that cannot be used with this training config."""


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """Parse a DeepSpeed JSON file; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DeepSpeedConfigError(f"{path}: DeepSpeed config file not found (deepspeed.config)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    return data


def _fill(section: dict[str, Any], key: str, value: Any, *, missing_ok: bool = True) -> None:
    if section.get(key) == "auto" or (missing_ok and key not in section):
        section[key] = value


def _find_auto(data: Any, prefix: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            found += _find_auto(value, f"{prefix}{key}.")
    elif data == "auto":
        found.append(prefix.rstrip("."))
    return found


def build_deepspeed_config(
    raw: dict[str, Any], config: TrainingConfig, *, world_size: int, hidden_size: int, source: str = "<deepspeed>"
) -> dict[str, Any]:
    """The filled DeepSpeed config dict (the input is not modified)."""
    ds = copy.deepcopy(raw)
    t = config.train
    for section in ("optimizer", "scheduler"):
        if section in ds:
            logger.warning(
                "%s: removing the '%s' section (type %s): road_vlm builds its own AdamW with a separate projector "
                "learning rate and a warmup+%s schedule; DeepSpeed's would replace both",
                source, section, ds[section].get("type"), t.lr_scheduler,
            )
            del ds[section]

    micro = t.per_device_batch_size
    accum = t.gradient_accumulation_steps
    for key, want in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                      ("train_batch_size", micro * accum * world_size)):
        value = ds.get(key, "auto")
        if value != "auto" and int(value) != want:
            raise DeepSpeedConfigError(
                f"{source}: '{key}' is {value} but the training config implies {want} "
                "(set it to \"auto\" or change train.per_device_batch_size / train.gradient_accumulation_steps)"
            )
        ds[key] = want

    ds.setdefault("bf16", {})
    ds.setdefault("fp16", {})
    _fill(ds["bf16"], "enabled", bool(t.bf16))
    _fill(ds["fp16"], "enabled", bool(t.fp16))
    if ds["bf16"]["enabled"] != t.bf16 or ds["fp16"]["enabled"] != t.fp16:
        raise DeepSpeedConfigError(
            f"{source}: bf16/fp16 'enabled' disagree with train.bf16={t.bf16} / train.fp16={t.fp16}; use \"auto\""
        )
    _fill(ds, "gradient_clipping", float(t.max_grad_norm))

    zero = ds.setdefault("zero_optimization", {})
    if config.model.quantization != "none":
        if zero_stage(ds) == 3:
            raise DeepSpeedConfigError(
                f"{source}: ZeRO-3 cannot train on a quantized base (model.quantization={config.model.quantization}):"
                " DeepSpeed partitions parameters as floating-point tensors and does not support bitsandbytes' "
                "packed 4/8-bit weights. Use ZeRO-2 (configs/deepspeed/zero2.json): the quantized base is small "
                "enough to keep a full copy per GPU"
            )
        if t.bf16 or t.fp16:  # prepare_kbit_training put the norms in fp32: DeepSpeed must not cast them back
            ds.setdefault("data_types", {}).setdefault("keep_in_fp32_modules", list(FP32_NORMS))
    if zero.get("overlap_comm") and not _cuda_available():
        # overlap_comm overlaps gradient reduction with backward on CUDA streams. On the CPU accelerator the
        # reductions become asynchronous gloo operations that can interleave with the trainer's own collectives;
        # seen here once as a gloo "collective mismatch" abort at a checkpoint of a 2-process CPU run.
        logger.info("%s: overlap_comm turned off (no CUDA: nothing to overlap on the CPU)", source)
        zero["overlap_comm"] = False
    _fill(zero, "reduce_bucket_size", hidden_size * hidden_size, missing_ok=False)
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size), missing_ok=False)
    _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size, missing_ok=False)
    ds.setdefault("steps_per_print", 10**9)  # road_vlm logs itself; keep DeepSpeed's own printing quiet
    ds["steps_per_print"] = int(ds["steps_per_print"])
    ds.setdefault("wall_clock_breakdown", False)

    left = _find_auto(ds)
    if left:
        raise DeepSpeedConfigError(f"{source}: cannot fill \"auto\" for {', '.join(left)}; give explicit values")
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@contextmanager
def zero3_partitioned_loading(ds_config: dict[str, Any] | None, model_config: Any = None) -> Iterator[None]:
    """While active, transformers' ``from_pretrained`` builds the model inside ``deepspeed.zero.Init`` and loads
    the weights partition by partition (its ``HfDeepSpeedConfig`` route, as HF's Trainer does): no rank ever holds
    the whole base. ``None``: a no-op (ZeRO-0/1/2 keep a full copy per rank anyway). Unset afterwards, so later
    loads in the same process (the final reload check) are ordinary ones.

    ``model_config``: the checkpoint's config, whose modeling modules are imported first. zero.Init wraps every
    module class's ``__init__`` and puts back what it saw on exit; a class first defined inside the context is
    wrapped before class decorators run, so on exit it loses them (transformers' kernels decorator on
    LlamaAttention: models built later failed with "no attribute '_kernel_funcs'").
    """
    if ds_config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if model_config is not None:
        _import_model_classes(model_config)
    keep_alive = HfDeepSpeedConfig(copy.deepcopy(ds_config))  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def _import_model_classes(model_config: Any) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, MODEL_MAPPING

    for sub in (model_config, getattr(model_config, "text_config", None), getattr(model_config, "vision_config", None)):
        for mapping in (MODEL_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING):
            if sub is not None and type(sub) in mapping:
                mapping[type(sub)]  # noqa: B018 - the lookup imports the modeling module


def partition_stats(model: Any) -> dict[str, Any]:
    """How much of ``model``'s ZeRO-3-partitioned parameters this rank holds (elements), and of how many."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    return {"zero3_partitioned": bool(partitioned),
            "local_elements": int(sum(p.ds_tensor.numel() for p in partitioned)),
            "total_elements": int(sum(p.ds_numel for p in partitioned))}
