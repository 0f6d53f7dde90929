"""Whether this machine's accelerator can train in the precision a config asks for.

DeepSpeed refuses an unsupported half precision only once the engine is built, after the model and data are
loaded ("Type fp16 is not supported on your device."). On CPUs this is a property of the processor: DeepSpeed's
CPU accelerator has fp16 only where oneDNN has native fp16 kernels, which many x86 CPUs lack. Asking the
accelerator up front turns that into an error that names the key and the precisions that do work.
"""

from __future__ import annotations

from typing import Any

import torch

from road_vlm.train.config import ConfigError, TrainingConfig

_NAMES = {torch.float32: "fp32 (train.bf16 and train.fp16 false)", torch.bfloat16: "bf16 (train.bf16=true)",
          torch.float16: "fp16 (train.fp16=true)"}


def supported_training_dtypes(accel: Any = None) -> list[torch.dtype]:
    """The dtypes a DeepSpeed accelerator trains in; by default this process's (CUDA, or the CPU's with
    ``DS_ACCELERATOR=cpu``)."""
    if accel is None:
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
    dtypes = [torch.float32]
    if accel.is_bf16_supported():
        dtypes.append(torch.bfloat16)
    if accel.is_fp16_supported():
        dtypes.append(torch.float16)
    return dtypes


def check_training_precision(config: TrainingConfig, source: str = "config") -> None:
    """Raise ConfigError when ``train.bf16`` / ``train.fp16`` asks for a precision this accelerator lacks."""
    wanted = torch.bfloat16 if config.train.bf16 else torch.float16 if config.train.fp16 else None
    if wanted is None:
        return
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    supported = supported_training_dtypes(accel)
    if wanted in supported:
        return
    key = "train.bf16" if wanted is torch.bfloat16 else "train.fp16"
    device = accel.device_name()
    hint = " (DeepSpeed's CPU accelerator has fp16 only where oneDNN has native fp16 kernels)" \
        if device == "cpu" and wanted is torch.float16 else ""
    raise ConfigError(f"{source}: {key}=true, but this machine's {device} accelerator cannot train in "
                      f"{str(wanted).removeprefix('torch.')}{hint}; it supports "
                      + ", ".join(_NAMES[d] for d in supported))
