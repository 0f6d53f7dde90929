"""Merge an adapter into a standalone Hugging Face checkpoint, or export a RoAd adapter for the PEFT library.

``merge_checkpoint``: base + adapter (+ trained projector) -> a plain ``LlavaForConditionalGeneration`` directory
(safetensors weights, processor files, ``prompt_format.json``) that ``from_pretrained`` loads without road_vlm
and that computes what base + adapter computes. RoAd folds into the weights row-wise (``R W0``, ``R b``); LoRA
and the hybrid fold as ``R (W0 + s B A)``; the merge itself is the adapter engine's ``merge_adapter``.

``export_peft``: a RoAd adapter -> a PEFT ``RoadConfig`` directory, a LoRA adapter -> a PEFT ``LoraConfig``
directory (a trained projector goes in as PEFT ``modules_to_save``). The RoAd1+LoRA hybrid has no PEFT form and
is refused with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from road_vlm.data.template import PromptFormat
from road_vlm.model import load_vlm
from road_vlm.outputs import fresh_output, publish
from road_vlm.filenames import HF_CONFIG, ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR, PROMPT_FORMAT

PEFT_PREFIX = "base_model.model."


class ExportError(ValueError):
    """An adapter that cannot be exported as asked."""


def _checkpoint_dtype(model: str | Path) -> str | None:
    """The dtype a local checkpoint was saved in (so a bf16 base is exported as bf16), else None."""
    config = Path(str(model)) / HF_CONFIG
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    for source in (data, data.get("text_config") or {}):
        value = source.get("dtype") or source.get("torch_dtype")
        if isinstance(value, str) and value in ("float32", "bfloat16", "float16"):
            return value
    return None


def merge_checkpoint(
    model: str | Path,
    adapter: str | Path,
    output: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    quantization: str | None = None,
    dequantize: bool = False,
) -> Path:
    """Write base + ``adapter`` merged into one standalone HF checkpoint at ``output``; returns ``output``.

    ``dtype`` defaults to the precision the base checkpoint was saved in (fp32 if unknown). An adapter trained on
    a quantized base (``quantization``, by default the one it records) merges only with ``dequantize=True``: the
    base is loaded quantized, as in training, then dequantized to ``dtype`` and merged there.
    """
    output = Path(output)
    adapter = Path(adapter)
    tmp = fresh_output(output, overwrite)
    try:
        from road_vlm.adapters import adapted_layers, unload_adapters

        loaded = load_vlm(model, adapter, dtype=dtype or _checkpoint_dtype(model), merge=True,
                          quantization=quantization, dequantize=dequantize)
        if not adapted_layers(loaded.model):
            raise ExportError(f"{adapter}: the adapter adapted no layer; nothing to merge")
        unload_adapters(loaded.model)  # plain nn.Linear layers holding the merged weights: standard HF keys
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.processor.save_pretrained(tmp)
        loaded.prompt_format.save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, output)
    return output


def _exact_targets(keys: list[str], suffixes: tuple[str, ...]) -> str:
    """A regex that PEFT's ``re.fullmatch`` resolves to exactly the modules the adapter file holds weights for."""
    modules = sorted({k[len(PEFT_PREFIX):].rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in keys
                      if k.endswith(suffixes)})
    return "(?:" + "|".join(re.escape(m) for m in modules) + ")"


def export_peft(
    adapter: str | Path,
    output: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a RoAd (road1/2/4) or LoRA adapter as a PEFT adapter directory (``PeftModel.from_pretrained`` loads
    it). A trained projector goes in as PEFT ``modules_to_save``. The RoAd1+LoRA hybrid is refused."""
    from road_vlm.adapters import read_adapter_config
    from road_vlm.adapters.config import PEFT_VARIANT, ROAD_VARIANTS
    from road_vlm.adapters.io import read_base_name

    adapter = Path(adapter)
    output = Path(output)
    config = read_adapter_config(adapter)
    if config.variant == "none":
        raise ExportError(f"{adapter}: a projector-only checkpoint (variant none, LLaVA stage 1) has no PEFT "
                          "adapter to export; pass its projector.safetensors to `road-vlm build-base --projector`")
    if config.variant not in ROAD_VARIANTS and config.variant != "lora":
        raise ExportError(
            f"{adapter}: a {config.variant} hybrid (z = R (W0 h + s B A h + b)) is not expressible in PEFT: PEFT "
            "cannot stack its RoAd and LoRA tuners on one layer with the rotation applied after the LoRA update. "
            "Use `road-vlm merge` to get a standalone checkpoint instead"
        )
    is_lora = config.variant == "lora"
    allowed = (".lora_A.weight", ".lora_B.weight") if is_lora else (".road_theta", ".road_alpha")
    tensors: dict[str, torch.Tensor] = {}
    weights = adapter / ADAPTER_WEIGHTS
    modules_to_save = None
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {"format": "pt"}  # keeps a pair subset's record (PEFT ignores it)
            for key in f.keys():
                if not key.startswith(PEFT_PREFIX) or not key.endswith(allowed):
                    raise ExportError(f"{weights}: unexpected tensor {key!r} in a {config.variant} adapter")
                tensors[key] = f.get_tensor(key)
        projector = adapter / PROJECTOR
        if projector.is_file():
            with safe_open(str(projector), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[PEFT_PREFIX + key] = f.get_tensor(key)
            # PEFT matches modules_to_save by name suffix; LLaVA's projector module is "multi_modal_projector".
            modules_to_save = ["multi_modal_projector"]
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"{adapter}: cannot read adapter weights: {err}") from err
    if not any(k.endswith(allowed) for k in tensors):
        raise ExportError(f"{weights}: holds no adapter tensors")

    common = {
        "target_modules": _exact_targets(list(tensors), allowed),
        "modules_to_save": modules_to_save,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path or read_base_name(adapter),
        "revision": None,
    }
    if is_lora:
        # road_vlm's LoRA is PEFT's: y = W0 h + (lora_alpha / r) B A h, same tensor names.
        peft_config = {"peft_type": "LORA", "r": config.lora_r, "lora_alpha": config.lora_alpha,
                       "lora_dropout": config.lora_dropout, "bias": "none", "use_rslora": False,
                       "use_dora": False, "fan_in_fan_out": False, **common}
    else:
        peft_config = {"peft_type": "ROAD", "variant": PEFT_VARIANT[config.variant], "group_size": config.group_size,
                       "init_weights": True, **common}
    tmp = fresh_output(output, overwrite)
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
        if PromptFormat.load(adapter) is not None:  # PEFT ignores it; it keeps the prompt format with the weights
            shutil.copyfile(adapter / PROMPT_FORMAT, tmp / PROMPT_FORMAT)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, output)
    return output
