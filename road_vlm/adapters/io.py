"""Adapter directories: write and read them, in road_vlm's format and PEFT's RoAd format.

An adapter directory holds:

- ``adapter_config.json``
  * pure RoAd (road1/road2/road4): a PEFT ``RoadConfig`` (``peft_type: "ROAD"``, ``variant: "road_N"``,
    ``group_size``, ``target_modules`` = a regex that selects exactly the adapted layers), so
    ``PeftModel.from_pretrained`` loads it; PEFT RoAd directories load into road_vlm the same way.
  * LoRA / hybrid (``lora``, ``road1_lora``): road_vlm's own fields ``{"format": "road_vlm", "format_version": 1,
    "variant", "group_size", "target_modules", "lora_r", "lora_alpha", "lora_dropout", "train_projector"}``
    (PEFT has no RoAd+LoRA hybrid).
- ``adapter_model.safetensors``: keys ``base_model.model.<module>.road_theta`` / ``.road_alpha`` (1-D fp32, PEFT
  layout) and ``base_model.model.<module>.lora_A.weight`` ([r, d_in]) / ``.lora_B.weight`` ([d_out, r]).
  An adapter restricted to a pair subset records it in this file's safetensors metadata
  (``road_vlm.pair_subset``, ``road_vlm.pair_layout``), where PEFT does not look; its values outside the subset are
  exactly the identity, so PEFT computes the same model without knowing the subset.
- ``base_model_name_or_path`` in ``adapter_config.json`` (PEFT's field, in both formats) names the base the adapter
  was trained on, as it was given to the loader; ``road-vlm compose`` compares it.
- ``projector.safetensors`` (only when the adapter trained the projector): the projector's own state-dict keys
  relative to the model root, e.g. ``model.multi_modal_projector.linear_1.weight``. PEFT ignores this file.

Under DeepSpeed ZeRO-3 every rank must call :func:`save_adapter` (it gathers partitioned parameters, a
collective); only global rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .bnb import BASE_DOUBLE_QUANT_KEY, BASE_QUANTIZATION_KEY, base_quantization_metadata
from .config import (
    FROM_PEFT_VARIANT,
    PEFT_VARIANT,
    ROAD_VARIANTS,
    AdapterConfig,
    AdapterConfigError,
    variant_has_lora,
    variant_has_road,
)
from .inject import (
    attach_adapter,
    peft_target_regex,
    projector,
    registry,
    resolve_targets,
    set_active_adapter,
)
from .errors import AdapterFileError, AdapterStateError
from .layer import AdaptedLinear
from .rotation import road_param_size
from road_vlm.filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR

KEY_PREFIX = "base_model.model."
_KIND_SUFFIX = {
    "road_theta": "road_theta",
    "road_alpha": "road_alpha",
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
}
_MAX_LISTED = 10


def _listed(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _expected_shapes(module_name: str, d_out: int, d_in: int, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    if variant_has_road(config.variant):
        size = road_param_size(config.variant, d_out)
        out[f"{KEY_PREFIX}{module_name}.road_theta"] = (size,)
        out[f"{KEY_PREFIX}{module_name}.road_alpha"] = (size,)
    if variant_has_lora(config.variant):
        out[f"{KEY_PREFIX}{module_name}.lora_A.weight"] = (config.lora_r, d_in)
        out[f"{KEY_PREFIX}{module_name}.lora_B.weight"] = (d_out, config.lora_r)
    return out


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _writes_files() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def _gathered(params: list[nn.Parameter]):
    """Context in which ZeRO-3 partitioned parameters hold their full data (a collective on every rank)."""
    if any(_is_zero3(p) for p in params):
        import deepspeed  # only needed (and importable) in DeepSpeed runs

        return deepspeed.zero.GatheredParameters([p for p in params if _is_zero3(p)], modifier_rank=None)
    return nullcontext()


PAIR_SUBSET_KEY = "road_vlm.pair_subset"
PAIR_LAYOUT_KEY = "road_vlm.pair_layout"
_PAIR_FIELDS = ("pair_subset", "pair_layout")  # recorded in the weights file's metadata, not in the JSON


def base_name_of(model: nn.Module) -> Optional[str]:
    """The name or path the model was loaded from (None for a model built in memory)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def weights_metadata(config: AdapterConfig) -> dict[str, str]:
    """Safetensors metadata of an adapter's weights file (records its pair subset, if any)."""
    meta = {"format": "pt"}
    if config.pair_subset is not None:
        meta.update({PAIR_SUBSET_KEY: config.pair_subset, PAIR_LAYOUT_KEY: config.pair_layout})
    return meta


def config_to_file_dict(
    model: nn.Module, config: AdapterConfig, adapted: list[str], base_name: Optional[str] = None
) -> dict:
    """The ``adapter_config.json`` content for an adapter of ``config`` adapting ``adapted`` in ``model``."""
    if config.variant in ROAD_VARIANTS:
        return {
            "peft_type": "ROAD",
            "variant": PEFT_VARIANT[config.variant],
            "group_size": config.group_size,
            "target_modules": peft_target_regex(model, adapted),
            "init_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "task_type": None,
            "base_model_name_or_path": base_name,
            "revision": None,
        }
    fields = {k: v for k, v in config.to_dict().items() if k not in _PAIR_FIELDS}
    return {"format": "road_vlm", "format_version": 1, **fields, "base_model_name_or_path": base_name}


def save_adapter(model: nn.Module, path: Union[str, Path], name: str = "default") -> Path:
    """Write adapter ``name`` (and the projector if its config trains it) to directory ``path``.

    Collective under ZeRO-3: call on every rank; files are written on global rank 0 only.
    """
    reg = registry(model)
    if name not in reg.configs:
        raise AdapterStateError(f"no adapter named {name!r}; loaded: {sorted(reg.configs)}")
    if reg.merged == name:
        raise AdapterStateError(f"adapter {name!r} is merged; unmerge it before saving")
    config = reg.configs[name]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear) and name in m.specs}
    tensors_src: dict[str, tuple[nn.Parameter, tuple[int, ...]]] = {}
    identity_outside: dict[str, tuple[torch.Tensor, float]] = {}  # key -> (pair-subset mask, identity value)
    for module_name, layer in sorted(layers.items()):
        shapes = _expected_shapes(module_name, layer.out_features, layer.in_features, config)
        for kind, p in layer.adapter_parameters(name).items():
            key = f"{KEY_PREFIX}{module_name}.{_KIND_SUFFIX[kind]}"
            tensors_src[key] = (p, shapes[key])
            if name in layer.pair_masks and kind in ("road_theta", "road_alpha"):
                identity_outside[key] = (layer.pair_masks[name].cpu(), 0.0 if kind == "road_theta" else 1.0)
    proj_src: dict[str, tuple[nn.Parameter, tuple[int, ...]]] = {}
    if config.train_projector:
        prefix, proj = projector(model)
        for pname, p in proj.named_parameters():
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            proj_src[f"{prefix}.{pname}"] = (p, shape)

    all_params = [p for p, _ in tensors_src.values()] + [p for p, _ in proj_src.values()]
    writer = _writes_files()
    with _gathered(all_params):  # every rank enters (collective); only the writer copies to CPU
        tensors = _materialise(tensors_src) if writer else {}
        proj_tensors = _materialise(proj_src) if writer else {}
    for key, (mask, identity) in identity_outside.items():
        if key in tensors:  # write what the layer applies: the raw values outside the subset never act
            tensors[key] = torch.where(mask, tensors[key], identity)

    out = Path(path)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        metadata = {**weights_metadata(config), **base_quantization_metadata(layers.values())}
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata=metadata)
        if proj_tensors:
            save_file(proj_tensors, str(out / PROJECTOR), metadata={"format": "pt"})
        with open(out / ADAPTER_CONFIG, "w") as f:
            json.dump(config_to_file_dict(model, config, sorted(layers), base_name_of(model)), f, indent=2)
            f.write("\n")
    return out


def _materialise(src: dict[str, tuple[nn.Parameter, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, (p, shape) in src.items():
        t = p.detach()
        if t.numel() == 0 or tuple(t.shape) != shape:
            # A ZeRO-3 shard that was not gathered shows up as an empty tensor: never write that.
            raise AdapterStateError(
                f"refusing to save {key}: it has shape {tuple(t.shape)} but should be {shape} "
                "(ZeRO-3 partitioned parameter not gathered?)"
            )
        out[key] = t.to("cpu", copy=True).contiguous()
    return out


def read_adapter_config(path: Union[str, Path]) -> AdapterConfig:
    """Parse ``adapter_config.json`` of a road_vlm or PEFT RoAd directory into an AdapterConfig (with the pair
    subset recorded in the weights file, if any)."""
    path = Path(path)
    config = _read_config_json(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        return config
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AdapterFileError(f"{weights}: cannot read safetensors file: {exc}") from exc
    if PAIR_SUBSET_KEY not in meta:
        return config
    try:
        return dataclasses.replace(config, pair_subset=meta[PAIR_SUBSET_KEY],
                                   pair_layout=meta.get(PAIR_LAYOUT_KEY, "interleaved"))
    except AdapterConfigError as exc:
        raise AdapterFileError(f"{weights}: metadata {PAIR_SUBSET_KEY}: {exc}") from exc


def read_base_quantization(path: Union[str, Path]) -> Optional[tuple[str, bool]]:
    """``(method, double_quant)`` of the quantized base an adapter was saved on (``bnb.py``), None when it was
    saved on an unquantized base or by another tool."""
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        return None  # load_adapter reports the missing file
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AdapterFileError(f"{weights}: cannot read safetensors file: {exc}") from exc
    method = meta.get(BASE_QUANTIZATION_KEY)
    return None if method is None else (method, meta.get(BASE_DOUBLE_QUANT_KEY, "true") == "true")


def read_base_name(path: Union[str, Path]) -> Optional[str]:
    """``base_model_name_or_path`` recorded in an adapter directory's config (None when not recorded)."""
    try:
        raw = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = raw.get("base_model_name_or_path") if isinstance(raw, dict) else None
    return str(name) if name else None


def _read_config_json(path: Path) -> AdapterConfig:
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise AdapterFileError(f"{cfg_file}: not found (is {path} an adapter directory?)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{cfg_file}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{cfg_file}: expected a JSON object")
    try:
        if raw.get("format") == "road_vlm":
            fields = {k: v for k, v in raw.items()
                      if k not in ("format", "format_version", "base_model_name_or_path")}
            return AdapterConfig.from_dict(fields)
        peft_type = raw.get("peft_type")
        if peft_type == "ROAD":
            if raw.get("variant") not in FROM_PEFT_VARIANT:
                raise AdapterFileError(f"{cfg_file}: unknown PEFT RoAd variant {raw.get('variant')!r}")
            if raw.get("modules_to_save"):
                raise AdapterFileError(f"{cfg_file}: modules_to_save {raw['modules_to_save']} is not supported")
            targets = raw.get("target_modules")
            if targets is None:
                raise AdapterFileError(f"{cfg_file}: PEFT config has no target_modules")
            return AdapterConfig(
                variant=FROM_PEFT_VARIANT[raw["variant"]],
                group_size=raw.get("group_size", 64),
                target_modules=targets if isinstance(targets, str) else sorted(targets),
                train_projector=(path / PROJECTOR).is_file(),
            )
        raise AdapterFileError(
            f"{cfg_file}: not a road_vlm adapter nor a PEFT RoAd adapter (peft_type={peft_type!r})"
        )
    except AdapterConfigError as exc:
        raise AdapterFileError(f"{cfg_file}: {exc}") from exc


def _read_checked(file: Path, expected: dict[str, tuple[int, ...]], what: str) -> dict[str, torch.Tensor]:
    """Read ``file`` and require exactly ``expected`` keys and shapes and finite floating values."""
    if not file.is_file():
        raise AdapterFileError(f"{file}: not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            missing = set(expected) - keys
            extra = keys - set(expected)
            if missing:
                raise AdapterFileError(f"{file}: missing {len(missing)} {what} tensor(s): {_listed(missing)}")
            if extra:
                raise AdapterFileError(
                    f"{file}: {len(extra)} unexpected tensor(s) for layers this model/config does not adapt: "
                    f"{_listed(extra)}"
                )
            out = {}
            for key in sorted(keys):
                t = f.get_tensor(key)
                if tuple(t.shape) != expected[key]:
                    raise AdapterFileError(
                        f"{file}: tensor {key} has shape {tuple(t.shape)}, the base model needs {expected[key]}"
                    )
                if not t.is_floating_point():
                    raise AdapterFileError(f"{file}: tensor {key} has non-floating dtype {t.dtype}")
                if not bool(torch.isfinite(t).all()):
                    raise AdapterFileError(f"{file}: tensor {key} contains NaN or infinite values")
                out[key] = t
            return out
    except AdapterFileError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AdapterFileError(f"{file}: cannot read safetensors file: {exc}") from exc


def read_projector_weights(path: Union[str, Path], model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained projector of adapter directory ``path``, keyed as saved (relative to the model root) and checked
    against ``model``'s projector like the adapter weights are (names, shapes, finite floating values)."""
    proj_file = Path(path) / PROJECTOR
    prefix, proj = projector(model)
    if any(_is_zero3(p) for p in proj.parameters()):
        raise AdapterStateError(
            f"{proj_file}: the projector is ZeRO-3 partitioned; load adapters before DeepSpeed partitions the model"
        )
    expected = {f"{prefix}.{n}": tuple(p.shape) for n, p in proj.named_parameters()}
    return _read_checked(proj_file, expected, "projector")


def load_adapter(
    model: nn.Module, path: Union[str, Path], name: Optional[str] = None, *, load_projector: bool = True
) -> str:
    """Load a road_vlm or PEFT RoAd adapter directory as adapter ``name`` (default "default").

    Like :func:`add_adapter`, base weights are frozen and the loaded adapter becomes the active one.

    Everything is validated (config, tensor names, shapes, finiteness, projector) before the model is touched,
    so a failed load leaves the model unchanged. ``load_projector=False`` skips ``projector.safetensors``
    explicitly (the base projector is kept). Returns the adapter name.
    """
    path = Path(path)
    name = "default" if name is None else name
    reg = registry(model)
    if name in reg.configs:
        raise AdapterStateError(f"adapter {name!r} already exists; pass another name= to load {path}")
    if not path.is_dir():
        raise AdapterFileError(f"{path}: not a directory")
    config = read_adapter_config(path)
    try:
        targets = resolve_targets(model, config)
    except AdapterConfigError as exc:
        raise AdapterFileError(f"{path / ADAPTER_CONFIG}: {exc}") from exc
    expected: dict[str, tuple[int, ...]] = {}
    for module_name, mod in targets.items():
        expected.update(_expected_shapes(module_name, mod.out_features, mod.in_features, config))
    weights = _read_checked(path / ADAPTER_WEIGHTS, expected, "adapter")

    proj_values: dict[str, torch.Tensor] = {}
    proj_file = path / PROJECTOR
    if load_projector and (config.train_projector or proj_file.is_file()):
        if not proj_file.is_file():
            raise AdapterFileError(f"{proj_file}: not found, but the adapter config says train_projector")
        proj_values = read_projector_weights(path, model)
        if reg.projector_owner is not None and reg.projector_owner != name:
            raise AdapterStateError(
                f"{proj_file}: the projector of adapter {reg.projector_owner!r} is already loaded and the projector "
                "is shared by all adapters; pass load_projector=False or use separate model instances"
            )

    # Everything is valid: attach (cannot fail on input any more) and copy values in.
    layers = attach_adapter(model, config, name)
    for module_name, layer in layers.items():
        layer.set_adapter_tensors(name, {kind: weights[f"{KEY_PREFIX}{module_name}.{_KIND_SUFFIX[kind]}"]
                                         for kind in layer.adapter_parameters(name)})
    with torch.no_grad():
        if proj_values:
            prefix, proj = projector(model)
            for n, p in proj.named_parameters():
                p.copy_(proj_values[f"{prefix}.{n}"].to(p.dtype))
            reg.projector_owner = name
    for p in model.parameters():
        p.requires_grad_(False)
    set_active_adapter(model, name)
    return name
