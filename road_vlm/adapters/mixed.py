"""Mixed-adapter batches: which bank row each batch row reads, and the per-layer tables one block uses.

A ``per_sample_adapters`` block fixes every batch row's adapter, so :class:`BatchRows` (the row indices) is built
once per block for the whole model, and each layer's :class:`MixedTables` once per block from its bank; the decode
steps inside the block then only gather and multiply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch


@dataclass
class BatchRows:
    """The bank rows of one mixed batch, shared by every layer (rows are model-wide slots, see ``bank.py``)."""

    names: tuple[Optional[str], ...]  # batch row i uses names[i] (None: the base model)
    # (group_size, [batch] bank row of each batch row, 0 for rows whose adapter has another group size or none)
    rotations: list[tuple[int, torch.Tensor]]
    lora_names: tuple[str, ...]  # the batch's LoRA adapters, in the order of the LoRA stacks' rows 1..n
    lora_ids: torch.Tensor  # [batch] row in the LoRA stacks (0: no LoRA)
    max_row: int  # the largest bank row read: every layer's bank must have that many rows
    _on_device: dict = field(default_factory=dict)

    def on(self, device: torch.device) -> "BatchRows":
        """The same rows with their index tensors on ``device`` (moved once per device and block)."""
        if device.type == "cpu":
            return self
        moved = self._on_device.get(device)
        if moved is None:
            moved = self._on_device[device] = BatchRows(
                self.names, [(gs, rows.to(device)) for gs, rows in self.rotations], self.lora_names,
                self.lora_ids.to(device), self.max_row)
        return moved


def batch_rows(names: Sequence[Optional[str]], slots: Mapping[str, int], group_sizes: Mapping[str, int],
               lora: Sequence[str]) -> BatchRows:
    """:class:`BatchRows` for ``names``: ``slots`` maps each adapter to its bank row, ``group_sizes`` each RoAd
    adapter to its group size; ``lora`` lists the adapters with a LoRA part. One pass per distinct group size
    (normally exactly one); rows of other group sizes stay identity in that pass."""
    rotations, max_row = [], 0
    for gs in sorted({group_sizes[n] for n in names if n in group_sizes}):
        rows = [slots[n] if group_sizes.get(n) == gs else 0 for n in names]
        rotations.append((gs, torch.tensor(rows, dtype=torch.long)))
        max_row = max(max_row, *rows)
    lora_names = tuple(n for n in dict.fromkeys(names) if n in lora)
    lora_row = {n: i + 1 for i, n in enumerate(lora_names)}
    lora_ids = torch.tensor([lora_row.get(n, 0) for n in names], dtype=torch.long)
    return BatchRows(tuple(names), rotations, lora_names, lora_ids, max_row)


def lora_stacks(loras: Sequence[Optional[tuple[torch.Tensor, torch.Tensor]]], dtype: torch.dtype
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(A [n + 1, r_max, d_in], B [n + 1, d_out, r_max])`` stacking ``loras`` (``(A [r, d_in], B [d_out, r])``
    each, or None for zeros) after a zero row 0, ranks zero-padded to the largest; ``(None, None)`` if all None."""
    present = [lora for lora in loras if lora is not None]
    if not present:
        return None, None
    r_max = max(a.shape[0] for a, _ in present)
    (a0, b0) = present[0]
    stack_a = torch.zeros(len(loras) + 1, r_max, a0.shape[1], dtype=dtype, device=a0.device)
    stack_b = torch.zeros(len(loras) + 1, b0.shape[0], r_max, dtype=dtype, device=a0.device)
    for i, lora in enumerate(loras, start=1):
        if lora is not None:
            a, b = lora
            stack_a[i, : a.shape[0]] = a.to(dtype)
            stack_b[i, :, : b.shape[1]] = b.to(dtype)
    return stack_a, stack_b


@dataclass
class MixedTables:
    """One layer's tables for one mixed batch."""

    batch: int  # names per block; activations are a multiple of it (num_return_sequences / beams)
    d_out: int
    # (group_size, [batch] bank rows, c1 table, s2 table): the bank's tables, in the layer's table dtype
    rotations: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
    lora_ids: torch.Tensor
    lora_a: Optional[torch.Tensor]  # [n_lora + 1, r_max, d_in]
    lora_b: Optional[torch.Tensor]  # [n_lora + 1, d_out, r_max], LoRA scale folded in
    # Per activation (batch, ndim, dtype): (LoRA ids, [(group_size, c1 rows, s2 rows)]) gathered, cast and shaped
    # once per block, so each decode step is a single fused pass with nothing to look up, cast or reshape.
    gathered: dict[tuple, tuple] = field(default_factory=dict)

    def rows_for(self, batch: int, ndim: int, dtype: torch.dtype) -> tuple:
        """``(lora_ids, [(group_size, c1, s2), ...])`` for a ``[batch, ..., d_out]`` activation; ``batch`` must be
        a multiple of the block's names (each row repeated k times, as ``generate`` does for k sequences)."""
        key = (batch, ndim, dtype)
        entry = self.gathered.get(key)
        if entry is None:
            repeat = batch // self.batch

            def expand(rows: torch.Tensor) -> torch.Tensor:
                return rows if repeat == 1 else rows.repeat_interleave(repeat)

            # Memory: 2 x batch x d_out per layer in the activation dtype, next to a much larger KV cache.
            view = (batch,) + (1,) * (ndim - 2) + (self.d_out,)
            rotations = [(gs, c1_t.index_select(0, expand(rows)).to(dtype).reshape(view),
                          s2_t.index_select(0, expand(rows)).to(dtype).reshape(view))
                         for gs, rows, c1_t, s2_t in self.rotations]
            entry = self.gathered[key] = (expand(self.lora_ids), rotations)
        return entry
