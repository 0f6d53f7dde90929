"""Composing RoAd adapters trained on disjoint pair subsets: R_C = R_A R_B, exactly, with no retraining.

Every RoAd adapter is block-diagonal in 2x2 blocks, one per pair of output dims, and each block depends only on
its own pair's parameters. Adapters whose pair subsets (``pairs.py``) are disjoint are the identity on each
other's pairs, so their product is again a RoAd adapter of the same variant whose parameters are, pair by pair,
those of the one adapter owning the pair (identity where none does). Composition is therefore a selection of
parameters: the composed adapter is a normal adapter that every command loads, merges, serves and exports.

LoRA updates are dense across output dims and do not compose this way: ``lora`` and ``road1_lora`` adapters are
refused with that reason.

Two entry points share the checks and the selection: :func:`compose_dirs` (adapter directories -> a new
directory, no model needed; ``road-vlm compose``) and :func:`compose_loaded` (adapters already loaded into a model
-> one more adapter named ``"a+b"``; the server's per-request composition).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from road_vlm.outputs import fresh_output, publish

from .config import ROAD_VARIANTS, AdapterConfig, variant_has_lora
from .errors import AdapterFileError, CompositionError
from .inject import adapted_layers, attach_adapter, registry
from .io import KEY_PREFIX, read_adapter_config, read_base_name, weights_metadata
from .pairs import num_pairs, pair_dims, param_mask, union
from .rotation import road_param_size
from road_vlm.filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR, PROMPT_FORMAT

COMPOSED_SEPARATOR = "+"


def composed_config(configs: Mapping[str, AdapterConfig]) -> AdapterConfig:
    """The config of the composition of ``configs`` (name -> config), after checking they compose: RoAd only,
    same variant, group size and targets, every one on a pair subset in one layout, at most one projector."""
    if len(configs) < 2:
        raise CompositionError(f"composition needs at least two adapters, got {list(configs)}")
    (first_name, first), *rest = configs.items()
    for name, config in configs.items():
        if variant_has_lora(config.variant) or config.variant not in ROAD_VARIANTS:
            why = ("its LoRA update B A is dense across output dims, so it does not stay on a pair subset"
                   if variant_has_lora(config.variant) else "it adapts no layer")
            raise CompositionError(f"adapter {name!r} is {config.variant}: only RoAd adapters (road1/road2/road4) "
                                   f"compose, {why}")
        if config.pair_subset is None:
            raise CompositionError(f"adapter {name!r} was trained on every pair (no adapter.pair_subset), so it "
                                   "overlaps any other adapter; train each adapter on its own pair_subset, e.g. "
                                   "'1/2' and '2/2'")
    for name, config in rest:
        for field in ("variant", "group_size", "target_modules", "pair_layout"):
            if getattr(config, field) != getattr(first, field):
                raise CompositionError(f"adapters {first_name!r} and {name!r} differ in {field}: "
                                       f"{getattr(first, field)!r} vs {getattr(config, field)!r}")
    with_projector = [n for n, c in configs.items() if c.train_projector]
    if len(with_projector) > 1:
        raise CompositionError(f"adapters {with_projector} each trained the projector; the composed adapter can "
                               "carry at most one (the projector is not a rotation on pairs)")
    subset = union([c.pairs for c in configs.values()])
    return dataclasses.replace(first, pair_subset=None if subset is None else str(subset),
                               train_projector=bool(with_projector))


def check_disjoint(layer: str, variant: str, group_size: int, size: int, configs: Mapping[str, AdapterConfig]) -> None:
    """Raise CompositionError naming ``layer`` and its first pair owned by two of ``configs``."""
    pairs = num_pairs(variant, size)
    owner = torch.full((pairs,), -1, dtype=torch.long)
    names = list(configs)
    for i, name in enumerate(names):
        mask = configs[name].pairs.pair_mask(pairs, layer=layer)
        clash = mask & (owner >= 0)
        if bool(clash.any()):
            p = int(clash.nonzero()[0])
            j, k = pair_dims(p, group_size)
            raise CompositionError(
                f"adapters {names[int(owner[p])]!r} ({configs[names[int(owner[p])]].pair_subset}) and {name!r} "
                f"({configs[name].pair_subset}) overlap: layer {layer}, pair {p} (output dims {j} and {k}); "
                "composable adapters must own disjoint pair subsets")
        owner[mask] = i


def select(variant: str, group_size: int, parts: Sequence[tuple[torch.Tensor, torch.Tensor, AdapterConfig]]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta, alpha)`` of the composition: each entry from the adapter owning its pair, identity elsewhere."""
    theta = torch.zeros_like(parts[0][0])
    alpha = torch.ones_like(parts[0][1])
    for t, a, config in parts:
        mask = param_mask(variant, group_size, config.pairs.pair_mask(num_pairs(variant, t.numel())))
        theta = torch.where(mask.to(t.device), t, theta)
        alpha = torch.where(mask.to(a.device), a, alpha)
    return theta, alpha


# -- adapter directories -----------------------------------------------------------------------------------------
def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    file = directory / ADAPTER_WEIGHTS
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for missing or corrupt files
        raise AdapterFileError(f"{file}: cannot read safetensors file: {exc}") from exc


def compose_dirs(
    directories: Sequence[str | Path], output: str | Path, *, overwrite: bool = False, ignore_base_name: bool = False
) -> Path:
    """Compose the adapters in ``directories`` into one adapter directory at ``output`` (written atomically).

    Checks the same base (the recorded ``base_model_name_or_path``, when both record one; ``ignore_base_name``
    for the same base at different paths), variant, group size, targets and tensor shapes, disjoint pair subsets
    (naming the first overlapping layer and pair) and at most one projector.
    """
    dirs = [Path(d) for d in directories]
    output = Path(output)
    if len(set(dirs)) != len(dirs):
        raise CompositionError(f"an adapter is listed twice: {[str(d) for d in dirs]}")
    configs = {str(d): read_adapter_config(d) for d in dirs}
    config = composed_config(configs)
    if not ignore_base_name:
        bases = {str(d): read_base_name(d) for d in dirs}
        recorded = {d: b for d, b in bases.items() if b}
        if len(set(recorded.values())) > 1:
            raise CompositionError(f"adapters were trained on different bases: {recorded}; pass "
                                   "--ignore-base-name if these are the same checkpoint at different paths")
    weights = {str(d): _read_weights(d) for d in dirs}
    first = str(dirs[0])
    shapes = {k: tuple(t.shape) for k, t in weights[first].items()}
    for d, w in weights.items():
        if {k: tuple(t.shape) for k, t in w.items()} != shapes:
            differing = sorted(set(w) ^ set(shapes)) or sorted(k for k in w if tuple(w[k].shape) != shapes[k])
            raise CompositionError(f"adapters {first} and {d} adapt different layers or shapes (first: "
                                   f"{differing[0]}); they must share base and targets")
    composed: dict[str, torch.Tensor] = {}
    for key in sorted(weights[first]):
        if not key.endswith(".road_theta"):
            continue
        layer = key[len(KEY_PREFIX):-len(".road_theta")]
        alpha_key = key[:-len("theta")] + "alpha"
        check_disjoint(layer, config.variant, config.group_size, weights[first][key].numel(), configs)
        parts = [(weights[d][key], weights[d][alpha_key], configs[d]) for d in configs]
        composed[key], composed[alpha_key] = select(config.variant, config.group_size, parts)

    formats = {d: (Path(d) / PROMPT_FORMAT).read_text() for d in configs if (Path(d) / PROMPT_FORMAT).is_file()}
    if len(set(formats.values())) > 1:
        raise CompositionError(f"adapters were trained with different prompt formats ({sorted(formats)}); "
                               "composing them would leave the chat template ambiguous")
    tmp = fresh_output(output, overwrite)
    try:
        save_file(composed, str(tmp / ADAPTER_WEIGHTS), metadata=weights_metadata(config))
        raw = json.loads((dirs[0] / ADAPTER_CONFIG).read_text())  # same variant/targets/base checked above
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(raw, indent=2) + "\n")
        for d in dirs:
            if (d / PROJECTOR).is_file():
                shutil.copyfile(d / PROJECTOR, tmp / PROJECTOR)
        if formats:
            (tmp / PROMPT_FORMAT).write_text(next(iter(formats.values())))
        (tmp / "composed_from.json").write_text(json.dumps(
            {"adapters": [{"path": str(d), "pair_subset": configs[str(d)].pair_subset} for d in dirs],
             "pair_subset": config.pair_subset, "pair_layout": config.pair_layout}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, output)
    return output


# -- adapters loaded in a model ----------------------------------------------------------------------------------
def composed_name(names: Sequence[str]) -> str:
    return COMPOSED_SEPARATOR.join(names)


def check_loaded(model: nn.Module, names: Sequence[str]) -> AdapterConfig:
    """Check that loaded adapters ``names`` compose (without changing the model); returns the composed config."""
    reg = registry(model)
    missing = [n for n in names if n not in reg.configs]
    if missing:
        raise CompositionError(f"adapter(s) {missing} are not loaded; loaded: {sorted(reg.configs)}")
    if len(set(names)) != len(names):
        raise CompositionError(f"an adapter is named twice in {composed_name(names)!r}")
    configs = {n: reg.configs[n] for n in names}
    config = composed_config(configs)
    for layer_name, layer in adapted_layers(model).items():
        present = [n for n in names if n in layer.specs]
        if present and len(present) != len(names):
            raise CompositionError(f"layer {layer_name} is adapted by {present} but not by all of {list(names)}")
        if present:
            size = road_param_size(config.variant, layer.out_features)
            check_disjoint(layer_name, config.variant, config.group_size, size, configs)
    return config


@torch.no_grad()
def compose_loaded(model: nn.Module, names: Sequence[str]) -> str:
    """Add the composition of loaded adapters ``names`` to ``model`` as adapter ``"a+b"`` (frozen; the active
    adapter is unchanged) and return that name; an existing composition is reused."""
    name = composed_name(names)
    reg = registry(model)
    if name in reg.configs:
        return name
    config = check_loaded(model, names)
    # A projector counts as the composition's only if it is the one loaded into the model's shared projector
    # (a server keeps per-adapter projectors apart and maps the composition to its part's own).
    config = dataclasses.replace(config, train_projector=config.train_projector and reg.projector_owner in names)
    layers = attach_adapter(model, config, name, composed=True)
    for layer in layers.values():
        parts = [(*layer.road_parameters(n), reg.configs[n]) for n in names]
        theta, alpha = select(config.variant, config.group_size, parts)
        layer.set_adapter_tensors(name, {"road_theta": theta, "road_alpha": alpha})
        for p in layer.adapter_parameters(name).values():
            p.requires_grad_(False)
    return name
