"""Model-level wiring: find the targets (language model only), wrap them, freeze the rest, switch adapters.

This is the only adapter module that knows the LLaVA layout (transformers 5.x ``LlavaForConditionalGeneration``):
``model.language_model`` (the Llama decoder, where adapters go), ``model.vision_tower`` (CLIP, whose attention
also has q/k/v_proj: never adapted) and ``model.multi_modal_projector`` (optionally trained).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from torch import nn

from .bnb import adapted_linear
from .config import AdapterConfig, variant_adapts_layers, variant_has_lora, variant_has_road
from .errors import AdapterConfigError, AdapterStateError
from .layer import AdaptedLinear
from .mixed import batch_rows

_LM_PATHS = ("model.language_model", "language_model")
_PROJECTOR_PATHS = ("model.multi_modal_projector", "multi_modal_projector")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
BASE_ALIASES = (None, "__base__")


@dataclass
class AdapterRegistry:
    """Model-level adapter bookkeeping, stored on the model as ``model._road_vlm_adapters``."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: Optional[str] = None
    merged: Optional[str] = None
    projector_owner: Optional[str] = None  # adapter whose projector weights are loaded into the base
    mixed: bool = False
    # adapter -> its row in every adapted layer's coefficient bank (bank.py): one row index per batch row serves
    # every layer of a mixed batch
    slots: dict[str, int] = field(default_factory=dict)

    def free_slot(self) -> int:
        taken = set(self.slots.values())
        return next(s for s in range(1, len(taken) + 2) if s not in taken)


def registry(model: nn.Module) -> AdapterRegistry:
    """The model's adapter registry (created empty on first use)."""
    reg = getattr(model, "_road_vlm_adapters", None)
    if reg is None:
        reg = AdapterRegistry()
        # object.__setattr__: a plain attribute, not a submodule/parameter, so it never enters state dicts.
        object.__setattr__(model, "_road_vlm_adapters", reg)
    return reg


def _find(model: nn.Module, paths: Sequence[str]) -> Optional[tuple[str, nn.Module]]:
    for path in paths:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    return None


def language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """``(dotted path, module)`` of the language model inside a LLaVA model."""
    found = _find(model, _LM_PATHS)
    if found is None:
        raise AdapterConfigError(
            f"{type(model).__name__} has no language model at any of {list(_LM_PATHS)}; "
            "road_vlm adapters expect a transformers LlavaForConditionalGeneration"
        )
    return found


def projector(model: nn.Module) -> tuple[str, nn.Module]:
    """``(dotted path, module)`` of the multimodal projector."""
    found = _find(model, _PROJECTOR_PATHS)
    if found is None:
        raise AdapterConfigError(
            f"{type(model).__name__} has no multimodal projector at any of {list(_PROJECTOR_PATHS)}"
        )
    return found


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """All adapted layers by full module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def _candidate_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers of the language model (wrapped or not), by full module name."""
    prefix, lm = language_model(model)
    out: dict[str, nn.Module] = {}
    for sub, mod in lm.named_modules():
        full = f"{prefix}.{sub}" if sub else prefix
        if isinstance(mod, AdaptedLinear):
            out[full] = mod
        elif isinstance(mod, nn.Linear) and not full.endswith(".base_layer"):
            out[full] = mod
    return out


def _matches(full_name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, full_name) is not None
    return any(full_name == t or full_name.endswith("." + t) for t in targets)


def resolve_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The language-model Linear layers ``config.target_modules`` selects, validated against ``group_size``."""
    if not variant_adapts_layers(config.variant):
        return {}
    candidates = _candidate_linears(model)
    chosen = {n: m for n, m in candidates.items() if _matches(n, config.target_modules)}
    if not chosen:
        lm_prefix, _ = language_model(model)
        examples = sorted(candidates)[:8]
        raise AdapterConfigError(
            f"target_modules {config.target_modules!r} matched no nn.Linear of the language model "
            f"({lm_prefix}, {len(candidates)} linear layers searched, e.g. {examples}); list entries match a name "
            "or a '.'-suffix of it, a string is a regex matched with re.fullmatch against the full module name"
        )
    if variant_has_road(config.variant):
        for n, m in chosen.items():
            if m.out_features % config.group_size != 0:
                raise AdapterConfigError(
                    f"group_size {config.group_size} does not divide d_out={m.out_features} of layer {n}"
                )
    return chosen


def _validate_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == "__base__":
        raise AdapterConfigError(
            f"invalid adapter name {name!r}: use letters, digits, '_' or '-' (and not '__base__')"
        )


def _wrap(model: nn.Module, full_name: str, module: nn.Module) -> AdaptedLinear:
    if isinstance(module, AdaptedLinear):
        return module
    parent_name, _, child = full_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapper = adapted_linear(module, full_name)
    wrapper.train(module.training)  # a new nn.Module starts in training mode; keep the model's mode (dropout!)
    setattr(parent, child, wrapper)
    return wrapper


def attach_adapter(
    model: nn.Module, config: AdapterConfig, name: str, *, composed: bool = False
) -> dict[str, AdaptedLinear]:
    """Validate, then wrap the targets and create identity-initialised parameters (no activation/freezing).

    ``composed``: ``name`` is a composition ``"a+b"`` of valid names (``compose.py``); '+' is not allowed in the
    names users give, so a composition can never shadow a loaded adapter."""
    for part in name.split("+") if composed else [name]:
        _validate_name(part)
    config.validate()
    reg = registry(model)
    if name in reg.configs:
        raise AdapterStateError(f"adapter {name!r} already exists; pick another name or delete it first")
    if reg.merged is not None:
        raise AdapterStateError(f"adapter {reg.merged!r} is merged; unmerge it before adding adapters")
    targets = resolve_targets(model, config)
    if config.train_projector:
        projector(model)  # fail before touching anything if there is none
    layers = {}
    slot = reg.free_slot()
    for full, mod in targets.items():
        layer = _wrap(model, full, mod)
        layer.add(name, config, row=slot)
        layers[full] = layer
    reg.configs[name] = config
    reg.slots[name] = slot
    return layers


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default") -> list[str]:
    """Add a fresh (identity) adapter, freeze every base weight, make the new adapter the active one.

    Returns the adapted module names. Only the active adapter (and the projector if its config says
    ``train_projector``) has ``requires_grad=True``.
    """
    layers = attach_adapter(model, config, name)
    for p in model.parameters():
        p.requires_grad_(False)
    set_active_adapter(model, name)
    return sorted(layers)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter from every layer (its projector weights, if loaded, stay in the base)."""
    reg = registry(model)
    if name not in reg.configs:
        raise AdapterStateError(f"no adapter named {name!r}; loaded: {sorted(reg.configs)}")
    if reg.merged == name:
        raise AdapterStateError(f"adapter {name!r} is merged; unmerge it first")
    for layer in adapted_layers(model).values():
        layer.remove(name)
    del reg.configs[name]
    del reg.slots[name]
    if reg.active == name:
        reg.active = None
    if reg.projector_owner == name:
        reg.projector_owner = None


def unload_adapters(model: nn.Module) -> None:
    """Replace every adapted layer by its plain base ``nn.Linear`` and forget all adapters.

    After :func:`merge_adapter` this leaves a plain transformers model holding the merged weights, whose
    ``save_pretrained`` writes the usual checkpoint keys (no ``.base_layer.``).
    """
    reg = registry(model)
    if reg.mixed:
        raise AdapterStateError("cannot unload adapters inside per_sample_adapters")
    for full, layer in adapted_layers(model).items():
        parent_name, _, child = full.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    object.__setattr__(model, "_road_vlm_adapters", AdapterRegistry())


def set_active_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Make ``name`` the adapter applied (and trained) outside ``per_sample_adapters``; None = base model."""
    reg = registry(model)
    if name is not None and name not in reg.configs:
        raise AdapterStateError(f"no adapter named {name!r}; loaded: {sorted(reg.configs)}")
    if reg.merged is not None and name != reg.merged:
        raise AdapterStateError(f"adapter {reg.merged!r} is merged; unmerge it before switching adapters")
    for layer in adapted_layers(model).values():
        layer.active_adapter = name if name in layer.specs else None
        layer.partners = layer.idle = ()
        for adapter in layer.specs:
            for p in layer.adapter_parameters(adapter).values():
                p.requires_grad_(adapter == name)
    train_proj = name is not None and reg.configs[name].train_projector
    found = _find(model, _PROJECTOR_PATHS)
    if found is not None:
        for p in found[1].parameters():
            p.requires_grad_(train_proj)
    reg.active = name


def set_composition(model: nn.Module, active: Optional[str], partners: Sequence[str] = (),
                    idle: Sequence[str] = ()) -> None:
    """Composed training's switch: ``active`` acts with its gradient, each of ``partners`` acts after it with its
    gradient cut, ``idle`` adapters do not act; partners and idle adapters still join the graph with weight zero
    (``AdaptedLinear._partners_forward``). ``requires_grad`` is left as it is: co-training keeps every task's
    adapter trainable for the whole run. Pairs must be disjoint (checked when the run is configured)."""
    reg = registry(model)
    named = [n for n in (active, *partners, *idle) if n is not None]
    unknown = [n for n in named if n not in reg.configs]
    if unknown:
        raise AdapterStateError(f"no adapter named {unknown[0]!r}; loaded: {sorted(reg.configs)}")
    if len(set(named)) != len(named):
        raise AdapterStateError(f"an adapter is named twice in active={active!r}, partners={list(partners)}, "
                                f"idle={list(idle)}")
    if reg.merged is not None:
        raise AdapterStateError(f"adapter {reg.merged!r} is merged; unmerge it before composing adapters")
    for layer in adapted_layers(model).values():
        layer.active_adapter = active if active in layer.specs else None
        layer.partners = tuple(n for n in partners if n in layer.specs)
        layer.idle = tuple(n for n in idle if n in layer.specs)
    reg.active = active


def refresh_coefficients(model: nn.Module, name: Optional[str] = None) -> None:
    """Rewrite the coefficient banks of adapter ``name`` (default: all) from the parameters, at their next read.

    Needed only after editing adapter parameters in place while the model is in eval mode (adding, loading,
    ``eval()``, ``load_state_dict`` and ``Module.to`` refresh the banks themselves; see ``layer.py``)."""
    for layer in adapted_layers(model).values():
        layer.refresh_coefficients(name)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once; ZeRO-3 shapes respected)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def merge_adapter(model: nn.Module, name: str = "default") -> None:
    """Fold adapter ``name`` into the base weights of every layer it adapts (row-wise, O(d_out * d_in))."""
    reg = registry(model)
    if name not in reg.configs:
        raise AdapterStateError(f"no adapter named {name!r}; loaded: {sorted(reg.configs)}")
    if reg.merged is not None:
        raise AdapterStateError(f"adapter {reg.merged!r} is already merged; unmerge it first")
    if reg.mixed:
        raise AdapterStateError("cannot merge inside per_sample_adapters")
    layers = [layer for layer in adapted_layers(model).values() if name in layer.specs]
    for layer in layers:  # before any weight changes: a refusal leaves the model as it was
        layer.check_mergeable(name)
    for layer in layers:
        layer.merge(name)
    reg.merged = name
    # The merged adapter is what the model computes now; record it as active so state reads consistently.
    reg.active = name
    for layer in adapted_layers(model).values():
        layer.active_adapter = name if name in layer.specs else None


def unmerge_adapter(model: nn.Module) -> None:
    """Undo :func:`merge_adapter` with the analytic 2x2 inverses; refuses before touching any weight if a
    rotation block is singular (the error names the layer)."""
    reg = registry(model)
    if reg.merged is None:
        raise AdapterStateError("no adapter is merged")
    layers = [layer for layer in adapted_layers(model).values() if layer.merged is not None]
    for layer in layers:
        layer.check_unmergeable()
    for layer in layers:
        layer.unmerge()
    reg.merged = None


@contextmanager
def per_sample_adapters(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[None]:
    """Within the block, batch row i uses adapter ``names[i]`` (None or "__base__" = base model).

    Works for ``model(...)`` and ``model.generate(...)`` (batches that are k * len(names) rows, as produced by
    ``num_return_sequences=k``, repeat each name k times). Inference only: the model must be in eval mode.
    """
    reg = registry(model)
    names = [None if n in BASE_ALIASES else n for n in names]
    if not names:
        raise AdapterStateError("per_sample_adapters needs at least one name")
    unknown = sorted({n for n in names if n is not None and n not in reg.configs})
    if unknown:
        raise AdapterStateError(f"unknown adapter(s) {unknown}; loaded: {sorted(reg.configs)}")
    if model.training:
        raise AdapterStateError("per_sample_adapters is inference-only; call model.eval() first")
    if reg.merged is not None:
        raise AdapterStateError(f"adapter {reg.merged!r} is merged; unmerge it before mixed-adapter batches")
    if reg.mixed:
        raise AdapterStateError("per_sample_adapters blocks cannot be nested")
    layers = list(adapted_layers(model).values())
    rows = batch_rows(names, reg.slots,
                      {n: c.group_size for n, c in reg.configs.items() if variant_has_road(c.variant)},
                      [n for n, c in reg.configs.items() if variant_has_lora(c.variant)])
    reg.mixed = True
    try:
        for layer in layers:
            layer.build_mixed_tables(list(names), dtype=layer.table_dtype, rows=rows)
        yield
    finally:
        for layer in layers:
            layer.clear_mixed_tables()
        reg.mixed = False


def peft_target_regex(model: nn.Module, adapted: Sequence[str]) -> str:
    """A regex that PEFT's ``re.fullmatch`` resolves to exactly ``adapted`` in this model.

    Layer indices are generalised to ``\\d+`` when that still selects exactly the same modules (the usual
    "every layer" case, short and readable); otherwise the exact names are listed.
    """
    wanted = set(adapted)
    general = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in wanted})
    pattern = "(?:" + "|".join(general) + ")"
    linear_names = {
        n.removesuffix(".base_layer") for n, m in model.named_modules() if isinstance(m, (nn.Linear, AdaptedLinear))
    }
    if {n for n in linear_names if re.fullmatch(pattern, n)} == wanted:
        return pattern
    return "(?:" + "|".join(re.escape(n) for n in sorted(wanted)) + ")"
