"""Per-adapter multimodal projectors in one mixed batch: each image goes through its row's adapter's projector.

The adapter engine loads a trained projector into the model's one projector, shared by every row, which would leak
one adapter's projector into the others' images. So the serving engine loads adapters with ``load_projector=False``
and keeps each trained projector as its own module in a :class:`ProjectorBank`, installed in the base projector's
place. Images of rows without an adapter, or whose adapter kept the base projector, use the base one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from road_vlm.adapters.compose import COMPOSED_SEPARATOR
from road_vlm.adapters.inject import projector
from road_vlm.adapters.io import read_projector_weights
from road_vlm.generation import GenerationRequest


class ProjectorBank(nn.Module):
    """The multimodal projector, with one optional replacement per adapter, chosen per image.

    ``image_adapters`` (set around a batch) lists the adapter of every image in the batch, in the order LLaVA
    consumes them (row order); outside a batch every image goes through the base projector.
    """

    def __init__(self, base: nn.Module, overrides: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.base = base
        self.overrides = nn.ModuleDict(dict(overrides))
        self.image_adapters: list[str | None] | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.image_adapters is None:
            return self.base(features)
        if len(self.image_adapters) != features.shape[0]:
            raise RuntimeError(
                f"projector got {features.shape[0]} images but the batch has {len(self.image_adapters)} images"
            )
        groups: dict[str | None, list[int]] = {}
        for i, name in enumerate(self.image_adapters):
            groups.setdefault(name if name in self.overrides else None, []).append(i)
        out: torch.Tensor | None = None
        for name, rows in groups.items():
            module = self.base if name is None else self.overrides[name]
            index = torch.tensor(rows, device=features.device)
            projected = module(features.index_select(0, index))
            if out is None:
                out = projected.new_empty((features.shape[0], *projected.shape[1:]))
            out.index_copy_(0, index, projected)
        assert out is not None
        return out

    def source(self, adapter: str | None) -> str | None:
        """The adapter whose trained projector a row's images use (a composition's at most one part with one)."""
        if adapter is None or COMPOSED_SEPARATOR not in adapter:
            return adapter
        owners = [p for p in adapter.split(COMPOSED_SEPARATOR) if p in self.overrides]
        return owners[0] if owners else None


def trained_projector(directory: Path, model: nn.Module) -> nn.Module:
    """A copy of ``model``'s projector holding adapter ``directory``'s trained projector (read and checked by the
    adapter engine: AdapterFileError when it does not fit this base)."""
    prefix, base = projector(model)
    values = read_projector_weights(directory, model)
    module = copy.deepcopy(base)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(values[f"{prefix}.{name}"].to(param.dtype))
    return module


def install_projector_bank(model: nn.Module, overrides: Mapping[str, nn.Module]) -> None:
    """Put a :class:`ProjectorBank` of ``overrides`` (adapter name -> projector) in place of ``model``'s projector."""
    prefix, base = projector(model)
    parent_name, _, child = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, ProjectorBank(base, overrides))


@contextlib.contextmanager
def route_images(model: nn.Module, requests: Sequence[GenerationRequest]) -> Iterator[None]:
    """Around a prefill of ``requests``: each image goes through its row's adapter's projector."""
    _, bank = projector(model)
    if not isinstance(bank, ProjectorBank):
        yield
        return
    bank.image_adapters = [bank.source(r.adapter) for r in requests if r.prompt.pixel_values is not None]
    try:
        yield
    finally:
        bank.image_adapters = None
