"""The fused Triton rotation (``road_vlm::rotate_rows``) against the torch rotation in fp64, on the CPU through
Triton's interpreter. Shapes are small: the interpreter runs every program in Python."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (triton_rotation imports it lazily)

import pytest  # noqa: E402
import torch  # noqa: E402

from road_vlm.adapters import AdapterConfig, add_adapter, per_sample_adapters  # noqa: E402
from road_vlm.adapters import layer as layer_module  # noqa: E402
from road_vlm.adapters.rotation import apply_rotation, road_coefficients, swap_halves  # noqa: E402
from road_vlm.adapters.triton_rotation import (  # noqa: E402
    fused_rotation_applies,
    rotate_mixed,
    rotate_rows,
    triton_available,
)

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton)")

D_OUT = 1152  # one full block of 1024 columns and a partial one; a multiple of every group size below
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def _banks(group_size: int, capacity: int = 3, d_out: int = D_OUT, seed: int = 0):
    """fp32 (c1, s2) tables [capacity + 1, d_out] as the CoefficientBank holds them: row 0 the identity."""
    gen = torch.Generator().manual_seed(seed)
    c1, s2 = [torch.ones(1, d_out)], [torch.zeros(1, d_out)]
    for _ in range(capacity):
        theta = torch.randn(2 * d_out, generator=gen) * 0.7
        alpha = 1 + 0.3 * torch.randn(2 * d_out, generator=gen)
        a, b = road_coefficients("road4", group_size, theta, alpha)
        c1.append(a[None])
        s2.append(b[None])
    return torch.cat(c1), torch.cat(s2)


def _reference(y, ids, c1, s2, group_size, tokens_per_row):
    """Row t of y rotated by bank row ids[t // tokens_per_row] with the torch rotation, in fp64."""
    rows = ids.long().repeat_interleave(tokens_per_row)
    return apply_rotation(y.double(), c1.double()[rows], s2.double()[rows], group_size)


def _assert_matches(out, y, ids, c1, s2, group_size, tokens_per_row=1):
    """Within two roundings of the output dtype of the fp64 result, scaled by the products' size (cancellation)."""
    assert out.dtype == y.dtype and out.shape == y.shape
    ref = _reference(y, ids, c1, s2, group_size, tokens_per_row)
    rows = ids.long().repeat_interleave(tokens_per_row)
    size = (y.double() * c1.double()[rows]).abs() + (swap_halves(y.double(), group_size) * s2.double()[rows]).abs()
    bound = 2 * torch.finfo(y.dtype).eps * size + torch.finfo(y.dtype).tiny
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {float((err - bound).max()):.3g} over the bound"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group_size", [2, 6, 8, 64])
def test_matches_torch_rotation(group_size, dtype):
    c1, s2 = _banks(group_size)
    ids = torch.tensor([0, 2, 1, 3, 2], dtype=torch.int32)  # base row, repeated adapter rows
    y = torch.randn(len(ids), D_OUT, generator=torch.Generator().manual_seed(group_size)).to(dtype)
    out = rotate_rows(y, ids, c1, s2, group_size, 1)
    _assert_matches(out, y, ids, c1, s2, group_size)
    assert torch.equal(out[0].view(torch.uint8), y[0].view(torch.uint8))  # id 0: untouched


def test_base_rows_are_copied_bit_exactly_whatever_their_partners_hold():
    c1, s2 = _banks(8)
    y = torch.randn(3, D_OUT).to(torch.bfloat16)
    y[0, 0], y[0, 4], y[0, 9], y[0, 1150] = float("inf"), float("nan"), -float("inf"), -0.0  # pairs of row 0
    y[2, 5] = float("nan")
    ids = torch.tensor([0, 1, 0], dtype=torch.int32)
    out = rotate_rows(y, ids, c1, s2, 8, 1)
    for row in (0, 2):
        assert torch.equal(out[row].view(torch.int16), y[row].view(torch.int16)), f"row {row} changed"
    _assert_matches(out[1:2], y[1:2], ids[1:2], c1, s2, 8)  # rows read only their own elements


def test_prefill_rows_share_their_batch_row_adapter():
    c1, s2 = _banks(6)
    ids = torch.tensor([2, 0, 1], dtype=torch.int32)
    y = torch.randn(3 * 4, D_OUT, dtype=torch.float16)  # 3 batch rows x 4 tokens
    _assert_matches(rotate_rows(y, ids, c1, s2, 6, 4), y, ids, c1, s2, 6, tokens_per_row=4)


def test_rotate_mixed_maps_repeated_sequences_to_their_names_row():
    """generate() repeats each name's row k times in a row: [names * k, seq, d] reads names[i // k]."""
    c1, s2 = _banks(8)
    ids = torch.tensor([1, 3], dtype=torch.long)  # the layer passes the block's int64 rows as they are
    y = torch.randn(4, 3, D_OUT, dtype=torch.bfloat16)  # 2 names x 2 sequences, 3 tokens each
    out = rotate_mixed(y, ids, c1, s2, 8, names_per_block=2)
    assert out.shape == y.shape
    _assert_matches(out.reshape(-1, D_OUT), y.reshape(-1, D_OUT), ids, c1, s2, 8, tokens_per_row=6)


def test_strided_and_repeated_row_views():
    c1, s2 = _banks(64)
    ids = torch.tensor([1, 0, 2], dtype=torch.int32)
    wide = torch.randn(6, D_OUT + 64, dtype=torch.bfloat16)
    every_other = wide[::2, 32:32 + D_OUT]  # row stride 2 * (D_OUT + 64), not contiguous
    assert not every_other.is_contiguous()
    _assert_matches(rotate_rows(every_other, ids, c1, s2, 64, 1), every_other, ids, c1, s2, 64)
    same_row = wide[0, :D_OUT].expand(3, D_OUT)  # row stride 0
    _assert_matches(rotate_rows(same_row, ids, c1, s2, 64, 1), same_row, ids, c1, s2, 64)
    columns_strided = torch.randn(3, 2 * D_OUT, dtype=torch.bfloat16)[:, ::2]  # column stride 2: made dense first
    _assert_matches(rotate_rows(columns_strided, ids, c1, s2, 64, 1), columns_strided, ids, c1, s2, 64)


def test_bad_arguments_are_refused():
    c1, s2 = _banks(8)
    y = torch.randn(4, D_OUT)
    with pytest.raises(RuntimeError, match="tokens per row"):
        rotate_rows(y, torch.tensor([1, 2, 0], dtype=torch.int32), c1, s2, 8, 1)
    with pytest.raises(RuntimeError, match="fp32"):
        rotate_rows(y, torch.tensor([1, 2, 0, 1], dtype=torch.int32), c1.double(), s2.double(), 8, 1)


def test_opcheck():
    c1, s2 = _banks(8, capacity=2)
    ids = torch.tensor([2, 0], dtype=torch.int32)
    y = torch.randn(2 * 2, D_OUT, dtype=torch.bfloat16)
    torch.library.opcheck(rotate_rows, (y, ids, c1, s2, 8, 2))


def test_cpu_layers_keep_the_torch_path():
    c1, _ = _banks(8)
    assert not fused_rotation_applies(torch.randn(2, D_OUT), c1)


def test_mixed_batch_through_the_op_equals_the_torch_path(adx, monkeypatch):
    """The layer's wiring (normally CUDA only), forced on for the CPU: the same logits as the torch mixed path,
    with two group sizes in one batch (two passes) and a base row."""
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road4", group_size=adx.GROUP), name="a")
    add_adapter(model, AdapterConfig(variant="road2", group_size=8, target_modules=["o_proj"]), name="b")
    adx.randomize_adapter(model, "a", seed=1)
    adx.randomize_adapter(model, "b", seed=2)
    inputs = adx.make_inputs(batch=3, seq=2, seed=3, with_image=False)
    names = ["a", None, "b"]
    with torch.no_grad(), per_sample_adapters(model, names):
        torch_path = model(**inputs).logits
        calls = []
        monkeypatch.setattr(layer_module, "fused_rotation_applies", lambda y, c1: True)
        monkeypatch.setattr(layer_module, "rotate_mixed", lambda *a: calls.append(a[4]) or rotate_mixed(*a))
        fused = model(**inputs).logits
    assert set(calls) == {adx.GROUP, 8}
    torch.testing.assert_close(fused, torch_path, rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_matches_torch_rotation():
    """Under the interpreter here too (set for this process); test_cuda.py's mixed-batch tests, run in their own
    process by scripts/gpu_check.sh, drive the compiled kernel through the layer."""
    c1, s2 = (t.cuda() for t in _banks(8))
    ids = torch.tensor([0, 2, 1, 3], dtype=torch.int32, device="cuda")
    y = torch.randn(len(ids), D_OUT, device="cuda", dtype=torch.bfloat16)
    assert fused_rotation_applies(y, c1)
    out = rotate_rows(y, ids, c1, s2, 8, 1)
    _assert_matches(out.cpu(), y.cpu(), ids.cpu(), c1.cpu(), s2.cpu(), 8)
