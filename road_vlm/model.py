"""The one model loader: training, eval, chat, merge and serving all build their model here.

``load_vlm`` takes a LLaVA-1.5 checkpoint in Hugging Face format (a local directory or a hub id) and,
optionally, an adapter directory (road_vlm or PEFT format, with the trained projector when the checkpoint has
one). The prompt format is read from the adapter directory (``prompt_format.json``, written by training),
never guessed from folder names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch

from road_vlm.data.template import PromptFormat
from road_vlm.quantization import Quantization, check_quantized
from road_vlm.quantization import dequantize as dequantize_linears
from road_vlm.filenames import HF_CONFIG

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float64": torch.float64,
}


class LoadedVLM(NamedTuple):
    model: Any
    processor: Any
    prompt_format: PromptFormat


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``None``/``"auto"``: bf16 on CUDA (LLaVA's training precision), fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype)]
    except KeyError as err:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))} or 'auto'") from err


def num_image_tokens(processor: Any) -> int:
    """How many ``<image>`` ids one image expands to (576 for LLaVA-1.5-7B, 16 for the tiny model)."""
    image_processor = processor.image_processor
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    height = crop["height"] if "height" in crop else crop["shortest_edge"]
    patches = (height // processor.patch_size) ** 2
    extra = getattr(processor, "num_additional_image_tokens", 0) or 0
    if getattr(processor, "vision_feature_select_strategy", "default") == "default":
        extra -= 1  # the CLS feature is dropped
    return patches + extra


def contiguous_lm_head_input(model: Any) -> Any:
    """Make the language-model head see a contiguous input (idempotent; returns ``model``).

    transformers' LLaVA feeds the head ``hidden_states[:, -1:, :]`` at every decode step, a strided view. In
    torch 2.13 on the CPU, ``F.linear`` on a strided 3-D input with a *frozen* weight takes a slow path,
    orders of magnitude slower than on a contiguous input (``scripts/repro_strided_linear.py`` measures it with
    torch alone). Every model road_vlm builds is frozen, so every generate would pay it.
    Copying the [batch, 1, hidden] slice costs nothing next to the head's matmul.
    """
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_road_vlm_contiguous_input", False):
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
        head._road_vlm_contiguous_input = True
    return model


def recorded_quantization(*adapters: str | Path) -> Quantization | None:
    """The quantized base the adapters were trained on (recorded in their weights files), None when none was;
    adapters trained on different bases are an error (they must share one base)."""
    from road_vlm.adapters.io import read_base_quantization

    found = {Path(a): read_base_quantization(a) for a in adapters}
    kinds = set(found.values())
    if len(kinds) > 1:
        listed = ", ".join(f"{a}: {q[0] if q else 'none'}" for a, q in found.items())
        raise ValueError(f"the adapters were trained on differently quantized bases ({listed}); pass --quantization")
    recorded = kinds.pop() if kinds else None
    return None if recorded is None else Quantization(*recorded)


def load_base(
    model: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    local_files_only: bool | None = None,
    quantization: str | Quantization | None = None,
) -> tuple[Any, Any]:
    """Load a ``LlavaForConditionalGeneration`` and its processor (no adapter).

    ``quantization`` (``road_vlm.quantization``): none | nf4 | fp4 | int8 for the language model's linears; the
    4-bit layers compute in ``dtype``, and the rest of the model stays in it.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch_dtype = resolve_dtype(dtype, device)
    quant = Quantization.of(quantization)
    source = str(model)
    is_local = Path(source).exists()
    if is_local and not (Path(source) / HF_CONFIG).is_file():
        raise FileNotFoundError(f"{source}: not a Hugging Face model directory (no config.json)")
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    processor = AutoProcessor.from_pretrained(source, **kwargs)
    if quant.enabled:
        # bitsandbytes quantizes while loading onto the target device; a quantized model cannot be moved after.
        kwargs.update(quantization_config=quant.bnb_config(torch_dtype), device_map={"": torch.device(device)})
    vlm = LlavaForConditionalGeneration.from_pretrained(
        source, dtype=torch_dtype, use_safetensors=True, **kwargs
    )
    check_quantized(vlm, quant, source)
    if not quant.enabled:
        vlm.to(device)
    vlm.eval()
    contiguous_lm_head_input(vlm)
    # Batched generation pads on the left so that every row's last token is a real one.
    processor.tokenizer.padding_side = "left"
    return vlm, processor


def load_vlm(
    model: str | Path,
    adapter: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    adapter_name: str = "default",
    merge: bool = False,
    quantization: str | Quantization | None = None,
    dequantize: bool = False,
) -> LoadedVLM:
    """Base checkpoint + processor + optional adapter (and its trained projector), ready for generation.

    ``quantization``: the base's (``load_base``); None = the one the adapter was trained on (recorded in its
    weights file), else none. ``dequantize=True`` loads the quantized base and dequantizes it to ``dtype``
    before the adapter is added, the way to merge an adapter trained on a quantized base.
    ``merge=True`` folds the adapter into the base weights (no per-token overhead; one adapter only).
    """
    from road_vlm.adapters import load_adapter, merge_adapter

    if quantization is None and adapter is not None:
        quantization = recorded_quantization(adapter)
    vlm, processor = load_base(model, device=device, dtype=dtype, quantization=quantization)
    if dequantize:
        dequantize_linears(vlm, resolve_dtype(dtype, device))
    prompt_format = PromptFormat()
    if adapter is not None:
        adapter_dir = Path(adapter)
        name = load_adapter(vlm, adapter_dir, name=adapter_name)
        saved = PromptFormat.load(adapter_dir)
        if saved is None:
            logger.warning(
                "%s has no prompt_format.json; using LLaVA-1.5 defaults (vicuna_v1 template, pad images)",
                adapter_dir,
            )
        else:
            prompt_format = saved
        if merge:
            merge_adapter(vlm, name)
        vlm.to(device)
        vlm.eval()
    return LoadedVLM(vlm, processor, prompt_format)
