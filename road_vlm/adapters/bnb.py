"""Adapters on bitsandbytes-quantized linears (``Linear4bit`` NF4/FP4 and ``Linear8bitLt`` int8).

RoAd acts on a layer's *output* (``z = R (W0 h + b)``) and LoRA adds ``s B A h`` next to the frozen matmul, so
nothing about either changes on a quantized base: only the frozen matmul is bitsandbytes'. What does change:

- the base weight is ``uint8``/``int8`` storage, so it cannot say which dtype the layer computes in; the
  coefficient tables of mixed batches use the layer's compute dtype instead (``table_dtype``);
- merging would rotate the dequantized rows and re-quantize them, which changes the weights the adapter was
  trained against: refused, naming ``road-vlm merge --dequantize`` (dequantize the base first, then merge).

The adapter's weights file records which quantized base it was trained on (:func:`base_quantization_metadata`),
so eval, chat and serving load the same base by default.

bitsandbytes is an optional dependency (``pip install 'road-vlm[quant]'``); a bnb layer can only exist once
bitsandbytes has been imported, so :func:`quantization_kind` never imports it.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch
from torch import nn

from .errors import AdapterStateError
from .layer import AdaptedLinear

BASE_QUANTIZATION_KEY = "road_vlm.base_quantization"
BASE_DOUBLE_QUANT_KEY = "road_vlm.base_double_quant"


def quantization_kind(module: nn.Module) -> Optional[str]:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes linear, None for anything else."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return str(module.weight.quant_type)
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def double_quantized(module: nn.Module) -> bool:
    """Whether a 4-bit layer's quantization constants are quantized too (bnb's ``compress_statistics``)."""
    return bool(getattr(module.weight, "compress_statistics", False))


class BnbAdaptedLinear(AdaptedLinear):
    """:class:`AdaptedLinear` over a bitsandbytes linear: the same adapters and forward paths, no merge."""

    def __init__(self, base_layer: nn.Linear, module_name: str) -> None:
        super().__init__(base_layer, module_name)
        self.quantization = quantization_kind(base_layer)
        if self.quantization is None:
            raise TypeError(f"{module_name}: {type(base_layer).__name__} is not a bitsandbytes linear")

    @property
    def table_dtype(self) -> torch.dtype:
        # Linear4bit computes in its compute_dtype; Linear8bitLt returns the input's dtype, unknown here, so its
        # tables stay fp32 (exact) and each batch casts them once to the activation dtype.
        return getattr(self.base_layer, "compute_dtype", None) or torch.float32

    def check_mergeable(self, name: str) -> None:
        raise AdapterStateError(
            f"{self.module_name}: cannot merge adapter {name!r} into a {self.quantization} base layer: the rotated "
            "weights would have to be quantized again, which changes the weights the adapter was trained against. "
            "Use `road-vlm merge --dequantize` (dequantizes the base to bf16/fp16/fp32 first, then merges)"
        )


def adapted_linear(base_layer: nn.Linear, module_name: str) -> AdaptedLinear:
    """The adapted layer for ``base_layer``: :class:`BnbAdaptedLinear` for a bitsandbytes linear."""
    cls = BnbAdaptedLinear if quantization_kind(base_layer) is not None else AdaptedLinear
    return cls(base_layer, module_name)


def base_quantization_metadata(layers: Iterable[AdaptedLinear]) -> dict[str, str]:
    """Safetensors metadata recording the quantized base an adapter's layers sit on (empty for a plain base)."""
    kinds = {getattr(layer, "quantization", None): layer for layer in layers}
    kinds.pop(None, None)
    if not kinds:
        return {}
    if len(kinds) > 1:
        raise AdapterStateError(f"the adapted layers mix quantization formats {sorted(kinds)}")
    (kind, layer), = kinds.items()
    meta = {BASE_QUANTIZATION_KEY: kind}
    if kind != "int8":
        meta[BASE_DOUBLE_QUANT_KEY] = "true" if double_quantized(layer.base_layer) else "false"
    return meta
