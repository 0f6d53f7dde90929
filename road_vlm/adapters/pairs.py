"""Pair subsets: which 2x2 rotation blocks (pairs of output dims) of each layer an adapter may change.

A layer with ``d_out`` outputs and group size ``g`` has ``d_out / 2`` pairs. Pair ``p`` is element ``i = p % (g/2)``
of group ``p // (g/2)`` and couples output dims ``j = group * g + i`` and ``j + g/2`` (PEFT's layout, see
``rotation.py``). A subset ``"k/n"`` is the k-th (1-based) of n slices of the pairs, ``"k1,k2/n"`` a union of
slices; slices are *interleaved* (pair p is in slice ``p % n + 1``, spread evenly over every group and head) or
*contiguous* (pair p is in slice ``p * n // num_pairs + 1``).

Adapters on disjoint subsets commute and compose exactly (``compose.py``): each 2x2 block depends only on the
parameters of its own pair, so the composition is a selection of parameters, not a product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import AdapterConfigError

PAIR_LAYOUTS = ("interleaved", "contiguous")


@dataclass(frozen=True)
class PairSubset:
    """Slices ``slices`` (1-based, sorted) of ``of`` slices of every adapted layer's pairs, in ``layout``."""

    slices: tuple[int, ...]
    of: int
    layout: str = "interleaved"

    @classmethod
    def parse(cls, text: str, layout: str = "interleaved") -> "PairSubset":
        """``"k/n"`` or ``"k1,k2,.../n"`` (1-based slice numbers) in ``layout``."""
        if layout not in PAIR_LAYOUTS:
            raise AdapterConfigError(f"pair_layout must be one of {list(PAIR_LAYOUTS)}, got {layout!r}")
        if not isinstance(text, str) or text.count("/") != 1:
            raise AdapterConfigError(f"pair_subset must look like 'k/n' or 'k1,k2/n' (e.g. '1/2'), got {text!r}")
        head, _, tail = text.partition("/")
        try:
            of = int(tail)
            slices = tuple(sorted({int(k) for k in head.split(",")}))
        except ValueError:
            raise AdapterConfigError(f"pair_subset {text!r}: slice numbers must be integers, as in '1/2'") from None
        if of < 2:
            raise AdapterConfigError(f"pair_subset {text!r}: n must be at least 2 (n=1 is every pair: leave it unset)")
        if not slices or slices[0] < 1 or slices[-1] > of:
            raise AdapterConfigError(f"pair_subset {text!r}: slice numbers count from 1 to {of}")
        if len(slices) == of:
            raise AdapterConfigError(f"pair_subset {text!r} selects every slice, i.e. every pair: leave it unset")
        return cls(slices, of, layout)

    def __str__(self) -> str:
        return ",".join(map(str, self.slices)) + f"/{self.of}"

    def pair_mask(self, num_pairs: int, *, layer: str = "") -> torch.Tensor:
        """Bool ``[num_pairs]``: True where this subset owns the pair."""
        if num_pairs < self.of:
            where = f" of layer {layer}" if layer else ""
            raise AdapterConfigError(f"pair_subset {self}: the {num_pairs} pairs{where} cannot be cut into "
                                     f"{self.of} slices")
        p = torch.arange(num_pairs)
        slice_of = p % self.of if self.layout == "interleaved" else p * self.of // num_pairs
        owned = torch.tensor([k - 1 for k in self.slices])
        return torch.isin(slice_of, owned)

    def refined(self, of: int) -> "PairSubset":
        """The same pairs as slices of ``of`` (a multiple of ``self.of``): slice k of n is slices
        (k-1)c+1 .. kc of cn when contiguous and k, k+n, ... when interleaved."""
        c = of // self.of
        if self.layout == "interleaved":
            slices = tuple(sorted(k + self.of * t for k in self.slices for t in range(c)))
        else:
            slices = tuple(sorted((k - 1) * c + t + 1 for k in self.slices for t in range(c)))
        return PairSubset(slices, of, self.layout)


def union(subsets: list[PairSubset]) -> Optional[PairSubset]:
    """The subset owning every pair any of ``subsets`` owns (None when that is every pair)."""
    layouts = {s.layout for s in subsets}
    if len(layouts) != 1:
        raise AdapterConfigError(f"pair subsets in different layouts {sorted(layouts)} cannot be combined")
    of = math.lcm(*(s.of for s in subsets))
    slices = tuple(sorted({k for s in subsets for k in s.refined(of).slices}))
    return None if len(slices) == of else PairSubset(slices, of, subsets[0].layout)


def num_pairs(variant: str, param_size: int) -> int:
    """Pairs of a layer from the length of its ``road_theta`` (road1: d/2, road2: d, road4: 2d)."""
    if variant in ("road1", "road1_lora"):
        return param_size
    if variant == "road2":
        return param_size // 2
    if variant == "road4":
        return param_size // 4
    raise AdapterConfigError(f"variant {variant!r} has no RoAd parameters")


def param_mask(variant: str, group_size: int, pair_mask: torch.Tensor) -> torch.Tensor:
    """Bool mask over a layer's ``road_theta`` / ``road_alpha`` entries that belong to the pairs in ``pair_mask``.

    road1 stores one value per pair (index = pair); road2 one per output dim (both dims of a pair); road4 per group
    a cos block and a sin block of g values each (``rotation.road_coefficients``)."""
    half = group_size // 2
    groups = pair_mask.reshape(-1, 1, half)
    if variant in ("road1", "road1_lora"):
        return pair_mask.clone()
    if variant == "road2":
        return groups.expand(-1, 2, half).reshape(-1)
    if variant == "road4":
        return groups.unsqueeze(1).expand(-1, 2, 2, half).reshape(-1)
    raise AdapterConfigError(f"variant {variant!r} has no RoAd parameters")


def masked(theta: torch.Tensor, alpha: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta, alpha)`` with every entry outside ``mask`` at the identity (angle 0, scale 1); differentiable,
    so masked entries get no gradient and stay identity whatever the optimizer does to the raw values."""
    if mask is None:
        return theta, alpha
    return torch.where(mask, theta, 0.0), torch.where(mask, alpha, 1.0)


def pair_dims(pair: int, group_size: int) -> tuple[int, int]:
    """The two output dims pair ``pair`` couples."""
    half = group_size // 2
    j = (pair // half) * group_size + pair % half
    return j, j + half
