"""RoAd math on plain tensors: coefficients, the element-wise rotation, row-wise merge and the 2x2 inverse.

A RoAd transform of a vector y (length d_out) is block-diagonal with one 2x2 block per pair (j, k = j + g/2)
inside each group of g = group_size consecutive dims (PEFT's layout)::

    z_j = a_j y_j - b_j y_k,     z_k = b_k y_j + a_k y_k

Internally we keep it in a *sign-folded* form ``(c1, s2)``: ``c1 = a`` and ``s2`` = ``-b`` on the first half of
every group and ``+b`` on the second half, so that ``z = y * c1 + swap_halves(y) * s2``. That is the same
``y * cos + rotate_half(y) * sin`` of the paper, with the minus sign folded into the table once instead of
negating half of the activations on every call.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import AdapterConfigError


def road_param_size(variant: str, d_out: int) -> int:
    """Length of the 1-D ``road_theta`` / ``road_alpha`` tensors of a layer (PEFT's sizes)."""
    if variant in ("road1", "road1_lora"):
        return d_out // 2
    if variant == "road2":
        return d_out
    if variant == "road4":
        return 2 * d_out
    raise AdapterConfigError(f"variant {variant!r} has no RoAd parameters")


def road_coefficients(
    variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-dim ``(c1, s2)`` (sign-folded, see module docstring) from the stored parameters.

    Layouts follow ``peft/tuners/road/layer.py::_prepare_cols``: road1 stores g/2 values per group shared by
    both members of a pair; road2 one value per element; road4 per group first g values for the cos term
    (scale alpha[:g], angle theta[:g]) then g values for the sin term.
    """
    half = group_size // 2
    if variant in ("road1", "road1_lora"):
        theta = theta.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        alpha = alpha.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1)
        a = alpha * torch.cos(theta)
        b = alpha * torch.sin(theta)
    elif variant == "road2":
        a = alpha * torch.cos(theta)
        b = alpha * torch.sin(theta)
    elif variant == "road4":
        theta = theta.reshape(-1, 2, group_size)
        alpha = alpha.reshape(-1, 2, group_size)
        a = (alpha[:, 0] * torch.cos(theta[:, 0])).reshape(-1)
        b = (alpha[:, 1] * torch.sin(theta[:, 1])).reshape(-1)
    else:
        raise AdapterConfigError(f"variant {variant!r} has no RoAd rotation")
    sign = torch.ones(2, 1, dtype=b.dtype, device=b.device)
    sign[0] = -1.0
    s2 = (b.reshape(-1, 2, half) * sign).reshape(-1)
    return a, s2


def identity_coefficients(d_out: int, *, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c1, s2)`` of the identity transform."""
    return torch.ones(d_out, dtype=dtype, device=device), torch.zeros(d_out, dtype=dtype, device=device)


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """View the last dim as [groups, 2, half]."""
    d = t.shape[-1]
    return t.reshape(*t.shape[:-1], d // group_size, 2, group_size // 2)


def swap_halves(y: torch.Tensor, group_size: int) -> torch.Tensor:
    """Swap the two halves of every group of the last dim: [x1, x2] -> [x2, x1], as a contiguous copy.

    ``roll`` by one over the pair dim is the swap: one contiguous copy kernel, where swapping through strided half
    views is several (at group size 8, half-runs of 4 elements, those cost 4x the roll on the CPU), and every
    kernel saved counts on a decode step. Differentiable."""
    return y.reshape(-1, 2, group_size // 2).roll(1, 1).view_as(y)


def apply_rotation(y: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int) -> torch.Tensor:
    """Differentiable ``z = y * c1 + swap_halves(y) * s2`` (c1/s2 broadcast against y's leading dims)."""
    return y * c1 + swap_halves(y, group_size) * s2


_CPU_BLOCK_BYTES = 4 << 20
_CPU_MERGE_BLOCK_BYTES = 1 << 20


def _rotate_exact_in_place(y: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int) -> None:
    swapped = swap_halves(y, group_size)  # taken before y changes
    y.mul_(c1).add_(swapped.mul_(s2))  # both products rounded before the sum, as in apply_rotation


def _rotate_fused_in_place(y: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int) -> None:
    swapped = swap_halves(y, group_size)  # taken before y changes
    y.mul_(c1).addcmul_(swapped, s2)


def _in_row_blocks(rotate, y: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int) -> None:
    """``rotate(y, c1, s2, group_size)`` over the whole tensor; on the CPU, large [batch, tokens, d] activations
    (prefill) go in blocks of about 4 MiB so the three passes run out of cache (scripts/bench_adapters.py measures
    the prefill shapes). Blocks are slices of rows: the work does not depend on how many adapters the batch mixes."""
    if y.dim() != 3 or y.device.type != "cpu" or y.numel() * y.element_size() <= 2 * _CPU_BLOCK_BYTES:
        rotate(y, c1, s2, group_size)
        return
    c1e, s2e = c1.expand(y.shape), s2.expand(y.shape)
    rows = max(1, _CPU_BLOCK_BYTES // (y.shape[-1] * y.element_size()))
    for b in range(y.shape[0]):
        for r0 in range(0, y.shape[1], rows):
            blk = (b, slice(r0, r0 + rows))
            rotate(y[blk], c1e[blk], s2e[blk], group_size)


def apply_rotation_exact_(y: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int) -> torch.Tensor:
    """In-place ``y <- R y``, bit for bit the result of :func:`apply_rotation`, in four kernels.

    Products are rounded before the sum exactly as in ``y * c1 + rotate_half(y) * c2`` (no fused multiply-add),
    so single-adapter outputs match PEFT's RoAd exactly (files interoperate with identical logits). ``y`` must be
    a tensor the caller owns (the layer's fresh output) with c1/s2 broadcasting to its shape. No autograd.
    """
    _in_row_blocks(_rotate_exact_in_place, y, c1, s2, group_size)
    return y


def apply_rotation_fused_(y: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int) -> torch.Tensor:
    """In-place ``y <- R y`` with a fused multiply-add (results may differ from the exact form in the last bit).

    The serving hot path (mixed-adapter batches): three kernels (swapped copy, multiply, multiply-add), no output
    allocation (a fresh multi-MB buffer per layer costs page faults on the CPU), and on the CPU 4 MiB row blocks
    for large activations. ``y`` must be a tensor the caller owns (the layer's fresh output). No autograd.
    """
    _in_row_blocks(_rotate_fused_in_place, y, c1, s2, group_size)
    return y


def rotate_rows(weight: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int) -> torch.Tensor:
    """``R @ weight`` for a [d_out, d_in] matrix, row-wise in O(d_out * d_in) (no dense d_out x d_out R)."""
    d_out, d_in = weight.shape
    wv = weight.reshape(d_out // group_size, 2, group_size // 2, d_in)
    c1v = c1.reshape(d_out // group_size, 2, group_size // 2, 1)
    s2v = s2.reshape(d_out // group_size, 2, group_size // 2, 1)
    out = wv * c1v
    out[:, 0].addcmul_(wv[:, 1], s2v[:, 0])
    out[:, 1].addcmul_(wv[:, 0], s2v[:, 1])
    return out.reshape(d_out, d_in)


def rotate_rows_(
    weight: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int, *,
    block_bytes: Optional[int] = None,
) -> torch.Tensor:
    """In-place ``weight <- R @ weight`` (row-wise), O(d_out * d_in), no dense R.

    Merging is memory-bound. On the CPU the matrix is processed in blocks of whole groups of about
    ``block_bytes`` (default 1 MiB) so the five element-wise kernels per block run out of cache and main memory is
    read and written about once. On a GPU the default is one block: there each block costs five kernel launches, so
    many small blocks would make the merge launch-bound (slower than a dense product).
    Uses fused multiply-adds, so results may differ from :func:`rotate_rows` in the last bit.
    """
    d_out, d_in = weight.shape
    groups = d_out // group_size
    if block_bytes is None:
        block_bytes = _CPU_MERGE_BLOCK_BYTES if weight.device.type == "cpu" else weight.numel() * weight.element_size()
    wv = weight.view(groups, 2, group_size // 2, d_in)
    c1v = c1.reshape(groups, 2, group_size // 2, 1)
    s2v = s2.reshape(groups, 2, group_size // 2, 1)
    per_block = max(1, block_bytes // max(1, group_size * d_in * weight.element_size()))
    for g0 in range(0, groups, per_block):
        blk = slice(g0, g0 + per_block)
        first, second = wv[blk, 0], wv[blk, 1]
        first_old = first.clone()
        first.mul_(c1v[blk, 0]).addcmul_(second, s2v[blk, 0])
        second.mul_(c1v[blk, 1]).addcmul_(first_old, s2v[blk, 1])
    return weight


def invert_coefficients(
    c1: torch.Tensor, s2: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic inverse of every 2x2 block, in the same sign-folded form.

    Block ``[[a_j, S_j], [S_k, a_k]]`` (S = s2) has determinant ``a_j a_k - S_j S_k`` and inverse
    ``[[a_k, -S_j], [-S_k, a_j]] / det``. Returns ``(c1_inv, s2_inv, det)`` with det per pair ([d_out/2]);
    the caller decides what counts as singular (see :func:`singular_pairs`).
    """
    c1g = _grouped(c1, group_size)
    s2g = _grouped(s2, group_size)
    aj, ak = c1g[..., 0, :], c1g[..., 1, :]
    sj, sk = s2g[..., 0, :], s2g[..., 1, :]
    det = aj * ak - sj * sk
    c1_inv = torch.stack((ak / det, aj / det), dim=-2).reshape(c1.shape)
    s2_inv = torch.stack((-sj / det, -sk / det), dim=-2).reshape(s2.shape)
    return c1_inv, s2_inv, det.reshape(-1)


def singular_pairs(c1: torch.Tensor, s2: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices (into the d_out/2 pairs) of blocks that are singular or numerically indistinguishable from it.

    A block counts as singular when its determinant is zero, not finite, or smaller than the rounding error of
    the two products it is computed from (catastrophic cancellation): inverting it would amplify noise.
    """
    c1d, s2d = c1.double(), s2.double()
    c1g, s2g = _grouped(c1d, group_size), _grouped(s2d, group_size)
    p = c1g[..., 0, :] * c1g[..., 1, :]
    q = s2g[..., 0, :] * s2g[..., 1, :]
    det = (p - q).reshape(-1)
    noise = (p.abs() + q.abs()).reshape(-1) * (64 * torch.finfo(torch.float64).eps)
    bad = (~torch.isfinite(det)) | (det.abs() <= noise) | (det == 0)
    return torch.nonzero(bad).reshape(-1)
