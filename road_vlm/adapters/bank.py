"""One layer's coefficient bank: the RoAd rotation ``(c1, s2)`` of every adapter it holds, one table row each.

Tables ``c1`` and ``s2`` are ``[capacity + 1, d_out]`` in the adapter parameters' precision (fp32; fp64 on fp64
bases). Row 0 is the identity (``c1 = 1, s2 = 0``): batch rows without an adapter, and adapters that do not adapt
this layer, read it. An adapter keeps its row from :meth:`reserve` to :meth:`release`; ``inject.py`` reserves the
same row (the adapter's model-wide slot) in every layer, so one row-index tensor serves every layer of a batch.

The bank knows nothing about parameters: its owner (``layer.AdaptedLinear``) computes an adapter's coefficients
and :meth:`write` s them when the adapter is added, loaded or changed (see ``AdaptedLinear.refresh_coefficients``).
The single-adapter, mixed-batch and merge paths all read from here; so can a fused kernel taking the tables and a
row index per batch row.
"""

from __future__ import annotations

from typing import Optional

import torch


class CoefficientBank:
    """``(c1, s2)`` tables of one layer's adapters; see the module docstring."""

    def __init__(self, d_out: int) -> None:
        self.d_out = d_out
        self.rows: dict[str, int] = {}  # adapter name -> its row (>= 1)
        self.c1 = torch.ones(1, d_out)
        self.s2 = torch.zeros(1, d_out)
        # Casts of the tables to activation dtypes, and per-adapter row views of them, until the next write: a
        # bf16 decode step reads its coefficients without a cast or an indexing kernel per layer.
        self._casts: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._row_views: dict[tuple[str, Optional[torch.dtype]], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def capacity(self) -> int:
        """Rows available to adapters (row 0, the identity, not counted)."""
        return self.c1.shape[0] - 1

    def index(self, name: str) -> int:
        """The row of adapter ``name``."""
        return self.rows[name]

    def reserve(self, name: str, row: Optional[int] = None) -> int:
        """Give adapter ``name`` row ``row`` (default: the lowest free one), set to the identity; returns it."""
        taken = set(self.rows.values())
        if row is None:
            row = next(r for r in range(1, len(taken) + 2) if r not in taken)
        elif row < 1 or row in taken:
            raise ValueError(f"bank row {row} is not free (taken: {sorted(taken)})")
        self.ensure_capacity(row)
        self.rows[name] = row
        self._set(row, 1.0, 0.0)
        return row

    def ensure_capacity(self, rows: int) -> None:
        """Grow the tables (identity rows, doubling) so that row ``rows`` exists."""
        if rows > self.capacity:
            extra = max(rows, 2 * self.capacity) - self.capacity
            self.c1 = torch.cat([self.c1, self.c1.new_ones(extra, self.d_out)])
            self.s2 = torch.cat([self.s2, self.s2.new_zeros(extra, self.d_out)])
            self._casts.clear()
            self._row_views.clear()

    def release(self, name: str) -> None:
        """Free adapter ``name``'s row (back to the identity, so readers of the row see no adapter)."""
        row = self.rows.pop(name, None)
        if row is not None:
            self._set(row, 1.0, 0.0)

    def write(self, name: str, c1: torch.Tensor, s2: torch.Tensor) -> None:
        """Store adapter ``name``'s coefficients; the tables follow their device and dtype."""
        if self.c1.device != c1.device or self.c1.dtype != c1.dtype:
            self.c1 = self.c1.to(device=c1.device, dtype=c1.dtype)
            self.s2 = self.s2.to(device=c1.device, dtype=c1.dtype)
        self._set(self.rows[name], c1, s2)

    def tables(self, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c1, s2)``, each ``[capacity + 1, d_out]``, cast to ``dtype`` when given."""
        if dtype is None or dtype == self.c1.dtype:
            return self.c1, self.s2
        cast = self._casts.get(dtype)
        if cast is None:
            cast = self._casts[dtype] = (self.c1.to(dtype), self.s2.to(dtype))
        return cast

    def coefficients(self, name: str, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s ``(c1, s2)`` rows (views: clone before keeping them past the next write)."""
        key = (name, dtype)
        views = self._row_views.get(key)
        if views is None:
            c1, s2 = self.tables(dtype)
            row = self.rows[name]
            views = self._row_views[key] = (c1[row], s2[row])
        return views

    @torch.no_grad()
    def _set(self, row: int, c1, s2) -> None:
        self.c1[row] = c1
        self.s2[row] = s2
        self._casts.clear()
        self._row_views.clear()
