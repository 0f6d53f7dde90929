"""Quantized bases: the language model's linears in bitsandbytes NF4/FP4 (4-bit) or int8, nothing else.

As LLaVA's ``--bits 4/8`` recipe does, the vision tower, the projector and ``lm_head`` stay in the model dtype;
only the linears of ``model.language_model`` go through transformers' ``BitsAndBytesConfig``. Its
``llm_int8_skip_modules`` entries match a module name from its start or at its end, and an entry that matches
nothing is silently ignored (``"vision_tower"`` left the vision tower of transformers 5.x's LLaVA,
``model.vision_tower``, in 4 bits), so the skipped modules are given by full path and :func:`check_quantized`
verifies, layer by layer, what was really quantized.

Adapters on the quantized linears live in ``road_vlm.adapters.bnb``. bitsandbytes is an optional dependency:
``pip install 'road-vlm[quant]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

import torch
from torch import nn

QuantizationMethod = Literal["none", "nf4", "fp4", "int8"]
METHODS: tuple[str, ...] = get_args(QuantizationMethod)
# Full module paths in transformers 5.x's LlavaForConditionalGeneration (see the module docstring).
UNQUANTIZED = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
# DeepSpeed ``data_types.keep_in_fp32_modules`` patterns: the language model's norms under bf16/fp16 training.
FP32_NORMS = ["language_model.*norm"]


class QuantizationError(ValueError):
    """A quantization setting that cannot be used, or a model that was not quantized as asked."""


@dataclass(frozen=True)
class Quantization:
    """``method``: none | nf4 | fp4 (4-bit) | int8. ``double_quant``: 4-bit only, also quantize the per-block
    scales (QLoRA's double quantization, ~0.4 bit per weight saved)."""

    method: str = "none"
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"unknown quantization {self.method!r}; use one of {', '.join(METHODS)}")

    @classmethod
    def of(cls, value: Union[None, str, "Quantization"]) -> "Quantization":
        """``None`` -> none; ``"nf4"`` -> Quantization("nf4"); a Quantization as is."""
        if isinstance(value, Quantization):
            return value
        return cls("none" if value is None else str(value))

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def __str__(self) -> str:
        return self.method

    def bnb_config(self, compute_dtype: torch.dtype) -> Any:
        """transformers' ``BitsAndBytesConfig`` for this setting (4-bit layers compute in ``compute_dtype``)."""
        require_bitsandbytes()
        from transformers import BitsAndBytesConfig

        if self.method == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(UNQUANTIZED))
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.method, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(UNQUANTIZED),
        )


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise QuantizationError(
            "a quantized base needs bitsandbytes: pip install 'road-vlm[quant]' (or bitsandbytes>=0.50)"
        ) from err


def quantized_linears(model: nn.Module) -> dict[str, str]:
    """``{module name: "nf4" | "fp4" | "int8"}`` for every bitsandbytes linear of ``model`` (an adapted layer's
    base is named like the layer it replaced)."""
    from road_vlm.adapters.bnb import quantization_kind

    out = {}
    for name, module in model.named_modules():
        kind = quantization_kind(module)
        if kind is not None:
            out[name.removesuffix(".base_layer")] = kind
    return out


def check_quantized(model: nn.Module, quantization: Quantization, source: str) -> None:
    """Raise unless exactly the language model's linears are quantized with ``quantization.method``."""
    from road_vlm.adapters.inject import language_model

    lm_prefix, lm = language_model(model)
    wanted = {f"{lm_prefix}.{n}".removesuffix(".base_layer") for n, m in lm.named_modules()
              if isinstance(m, nn.Linear)} if quantization.enabled else set()
    got = quantized_linears(model)
    problems = []
    outside = sorted(set(got) - wanted)
    missing = sorted(wanted - set(got))
    other = sorted(n for n in set(got) & wanted if got[n] != quantization.method)
    if outside:
        problems.append(f"{len(outside)} layer(s) outside the language model are quantized (e.g. {outside[0]})")
    if missing:
        problems.append(f"{len(missing)} language-model linear(s) are not quantized (e.g. {missing[0]})")
    if other:
        problems.append(f"{len(other)} layer(s) are {got[other[0]]}, not {quantization.method} (e.g. {other[0]})")
    if problems:
        raise QuantizationError(f"{source} loaded with quantization={quantization}: " + "; ".join(problems))


def prepare_kbit_training(model: nn.Module) -> None:
    """What PEFT's ``prepare_model_for_kbit_training`` adds for a quantized base, beyond what road_vlm's training
    does anyway (frozen base, input grads under gradient checkpointing): the language model's norms in fp32 when
    the model is in bf16/fp16 (the quantized matmuls' inputs are normalised in full precision, as QLoRA and LLaVA's
    ``--bits`` do). DeepSpeed keeps them there (``FP32_NORMS`` in the DeepSpeed config)."""
    from road_vlm.adapters.inject import language_model

    _, lm = language_model(model)
    for name, module in lm.named_modules():
        if name.endswith("norm") and any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters()):
            module.float()


def dequantize(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace the quantized linears by plain ``nn.Linear`` layers holding the dequantized weights in ``dtype``
    (transformers' ``dequantize``), so the model can be merged and saved as an ordinary checkpoint."""
    if not quantized_linears(model):
        raise QuantizationError("dequantize: the base was not loaded quantized (the adapter records no quantized "
                                "base); give the quantization it was trained on (--quantization nf4|fp4|int8)")
    model.dequantize(dtype=dtype)
    leftover = quantized_linears(model)
    if leftover:
        raise QuantizationError(f"dequantize left {len(leftover)} quantized layer(s), e.g. {sorted(leftover)[0]}")
