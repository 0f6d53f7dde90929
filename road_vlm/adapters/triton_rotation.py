"""One fused Triton kernel for the mixed-batch RoAd rotation, registered as the torch custom op
``road_vlm::rotate_rows``.

The torch mixed path (``rotation.apply_rotation_fused_`` on gathered coefficient rows) is three element-wise kernels
plus Python dispatch per layer; on a GPU decode step those launches, not the arithmetic, cost the time. This kernel
does the whole rotation in one launch: each program takes one row of ``y`` and a block of its columns, reads the
row's bank row id, gathers ``c1``/``s2`` from the layer's fp32 banks, computes
``z_j = y_j * c1_j + y_partner(j) * s2_j`` (sign-folded layout, see ``rotation.py``) in fp32 and rounds once on
store. Rows with id 0 (the base model) are copied bit for bit: their partner element is never read, so an inf/NaN
there cannot leak into them.

As a custom op with a fake implementation, torch.compile and CUDA graphs can hold it. Triton is imported on the
first call, so tests can set ``TRITON_INTERPRET=1`` first (the interpreter runs the kernel on CPU tensors). The
layer uses it only for CUDA inference (:func:`fused_rotation_applies`); the CPU path stays plain torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

# Columns per program: a whole decode row of a 4096-wide layer in four programs per row, with no autotuning (one
# compiled kernel per activation dtype). Group sizes need not divide it: partners are addressed by index.
_BLOCK = 1024
_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.lru_cache(maxsize=None)
def _kernel():
    """The Triton kernel, compiled lazily (importing triton here, not at module import)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rotate_rows_kernel(y_ptr, y_row_stride, out_ptr, ids_ptr, c1_ptr, s2_ptr, d_out, group_size,
                           tokens_per_row, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_row = cols < d_out
        bank_row = tl.load(ids_ptr + t // tokens_per_row).to(tl.int64)
        # Broadcast to the block before comparing: the interpreter refuses a scalar-and-block mask.
        adapted = (tl.full([BLOCK], 0, tl.int64) + bank_row) != 0
        y_row = y_ptr + t.to(tl.int64) * y_row_stride
        y = tl.load(y_row + cols, mask=in_row)
        half = group_size // 2
        partner = tl.where(cols % group_size < half, cols + half, cols - half)
        # Masked off for base rows: their partners and bank rows are not read at all.
        work = in_row & adapted
        y_partner = tl.load(y_row + partner, mask=work, other=0.0).to(tl.float32)
        c1 = tl.load(c1_ptr + bank_row * d_out + cols, mask=work, other=1.0).to(tl.float32)
        s2 = tl.load(s2_ptr + bank_row * d_out + cols, mask=work, other=0.0).to(tl.float32)
        z = y.to(tl.float32) * c1 + y_partner * s2
        out = tl.where(adapted, z.to(y.dtype), y)
        tl.store(out_ptr + t.to(tl.int64) * d_out + cols, out, mask=in_row)

    return triton, rotate_rows_kernel


def _check(y: torch.Tensor, ids: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int,
           tokens_per_row: int) -> None:
    d_out = y.shape[-1]
    torch._check(y.dim() == 2, lambda: f"rotate_rows: y must be [T, d_out], got {tuple(y.shape)}")
    torch._check(y.dtype in _ACTIVATION_DTYPES, lambda: f"rotate_rows: y dtype {y.dtype} is not bf16/fp16/fp32")
    torch._check(ids.dim() == 1 and ids.dtype in (torch.int32, torch.int64),
                 lambda: "rotate_rows: row ids must be a 1-D int32 (or int64) tensor")
    torch._check(c1.dtype == torch.float32 and s2.dtype == torch.float32,
                 lambda: "rotate_rows: coefficient banks must be fp32")
    torch._check(c1.shape == s2.shape and c1.dim() == 2 and c1.shape[1] == d_out,
                 lambda: f"rotate_rows: banks must both be [capacity + 1, {d_out}]")
    torch._check(group_size >= 2 and group_size % 2 == 0 and d_out % group_size == 0,
                 lambda: f"rotate_rows: group size {group_size} must be even and divide d_out={d_out}")
    torch._check(tokens_per_row >= 1 and y.shape[0] == ids.shape[0] * tokens_per_row,
                 lambda: f"rotate_rows: {y.shape[0]} rows != {ids.shape[0]} ids x {tokens_per_row} tokens per row")


@torch.library.custom_op("road_vlm::rotate_rows", mutates_args=())
def rotate_rows(y: torch.Tensor, ids: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int,
                tokens_per_row: int) -> torch.Tensor:
    """Rotated copy of ``y`` [T, d_out] (any row stride): row ``t`` uses bank row ``ids[t // tokens_per_row]`` of
    the fp32 banks ``c1``/``s2`` [capacity + 1, d_out] (0: copied unchanged). Returns a contiguous tensor."""
    _check(y, ids, c1, s2, group_size, tokens_per_row)
    if y.stride(-1) != 1:  # the kernel addresses columns densely; rows may have any stride
        y = y.contiguous()
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return out
    triton, kernel = _kernel()
    grid = (y.shape[0], triton.cdiv(y.shape[1], _BLOCK))
    # Launch on y's GPU, not the current one (a model may live on any device).
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        kernel[grid](y, y.stride(0), out, ids.contiguous(), c1.contiguous(), s2.contiguous(), y.shape[1], group_size,
                     tokens_per_row, BLOCK=_BLOCK)
    return out


@rotate_rows.register_fake
def _rotate_rows_fake(y, ids, c1, s2, group_size, tokens_per_row):
    _check(y, ids, c1, s2, group_size, tokens_per_row)
    return y.new_empty(y.shape)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_rotation_applies(y: torch.Tensor, c1_table: torch.Tensor) -> bool:
    """Whether the layer's mixed-batch rotation of ``y`` goes through the kernel: CUDA inference on a bf16/fp16/fp32
    activation with fp32 banks, where triton is installed. Everything else keeps the torch path."""
    return (y.is_cuda and not (y.requires_grad and torch.is_grad_enabled()) and y.dtype in _ACTIVATION_DTYPES
            and c1_table.dtype == torch.float32 and c1_table.device == y.device and triton_available())


def rotate_mixed(y: torch.Tensor, ids: torch.Tensor, c1: torch.Tensor, s2: torch.Tensor, group_size: int,
                 names_per_block: int) -> torch.Tensor:
    """The mixed-batch rotation of a layer output ``y`` [batch, ..., d_out] through the op. ``ids`` holds one bank
    row per name of the block; ``batch`` is a multiple of it (``generate`` repeats each row k times in a row), so
    every name owns ``y.numel() / d_out / len(ids)`` consecutive rows of the flattened activation."""
    flat = y.reshape(-1, y.shape[-1])
    return rotate_rows(flat, ids, c1, s2, group_size, flat.shape[0] // names_per_block).view(y.shape)
