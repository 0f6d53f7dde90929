"""The adapted Linear: a frozen base ``nn.Linear`` plus any number of named adapters.

Forward paths:
- single adapter (the active one): ``z = R (W0 h + s B A h + b)`` with R and/or the LoRA part present per variant;
- merged: the adapter lives in the base weights, the layer is the bare base layer;
- mixed batch (inside ``per_sample_adapters``): every batch row picks an adapter (or none). The rotation is one
  gather of per-adapter tables ``c1/s2 [N+1, d_out]`` (row 0 = identity) plus one element-wise pass over the
  whole batch; the LoRA parts of lora/hybrid adapters are one gathered ``bmm`` with ranks padded to the largest.

Dtypes: adapter parameters are created in fp32 (small, and angles need the precision) even on a bf16/fp16 base
(fp64 on an fp64 base). Coefficients are computed in fp32 and cast to the activation dtype; the element-wise
rotation and the LoRA matmuls run in the activation dtype (bf16 on GPU), which keeps the decode path a gather plus
one multiply-add pass with no up/down casts of the activation. (A later ``model.to(bf16)``, or DeepSpeed's bf16
mode, casts adapter parameters like any other; DeepSpeed then keeps fp32 master copies in the optimizer.)
Merging is computed in fp32 (or fp64 for fp64 weights) and cast back to the weight dtype once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, variant_has_lora, variant_has_road
from .pairs import masked, param_mask
from .rotation import (
    apply_rotation,
    apply_rotation_exact_,
    apply_rotation_fused_,
    identity_coefficients,
    invert_coefficients,
    road_coefficients,
    road_param_size,
    rotate_rows_,
    singular_pairs,
)


class AdapterStateError(RuntimeError):
    """An adapter operation that is not valid in the model's current state (merged, unknown name, ...)."""


@dataclass(frozen=True)
class LayerAdapterSpec:
    """What one adapter needs to know in one layer."""

    variant: str
    group_size: int
    lora_r: int
    lora_scale: float
    lora_dropout: float


@dataclass
class _MergedState:
    """Everything needed to undo a merge, captured at merge time (small: O(d_out + r * (d_in + d_out)))."""

    name: str
    c1: Optional[torch.Tensor]
    s2: Optional[torch.Tensor]
    group_size: int
    lora_delta_factors: Optional[tuple[torch.Tensor, torch.Tensor, float]]


@dataclass
class _RotationBank:
    """Every RoAd adapter of one layer with its coefficients stacked per (group size, dtype), row 0 the identity.

    Mixed batches gather their rows from here, so entering ``per_sample_adapters`` (which continuous batching does
    whenever a row joins or leaves) looks names up instead of computing and stacking every adapter's tables again:
    with 32 adapters loaded and 16 in the batch, ~50 -> ~18 ms per change for LLaVA-7B's 224 adapted layers
    (scripts/bench_adapter_switch.py, 2-core CPU). Rebuilt when one of its adapters' parameters changed (see
    ``AdaptedLinear._rotation_bank``). Memory: 2 x (1 + n) x d_out values per layer and dtype, ~5.4 MB per adapter
    for LLaVA-7B in bf16.
    """

    stamps: dict[str, tuple]  # name -> its parameters' identity, version and storage when the bank was built
    rows: dict[str, tuple[int, int]]  # name -> (group_size, row in that group size's tables)
    tables: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]  # -> (c1, s2), each [1 + n, d_out]


@dataclass
class _MixedTables:
    """Per-layer gathered tables for a mixed batch, built once when ``per_sample_adapters`` is entered."""

    ids: torch.Tensor  # [batch] row index into the tables (0 = no adapter)
    # (group_size, [batch] row of each batch row in the bank's tables, c1 table, s2 table), one per group size
    rotations: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
    lora_a: Optional[torch.Tensor]  # [N+1, r_max, d_in]
    lora_b: Optional[torch.Tensor]  # [N+1, d_out, r_max], LoRA scale folded in
    # per activation (batch, ndim, dtype); batch is k * len(names) for num_return_sequences / beams: gathered rows
    by_shape: dict[tuple, tuple]


def _stamp(theta: torch.Tensor, alpha: torch.Tensor) -> tuple:
    """What tells whether a RoAd adapter's parameters changed since a table was built from them: ``_version``
    moves on every in-place update (optimizer steps, load_state_dict, copy_ under no_grad), ``data_ptr`` and the
    device on a swapped storage (``Module.to``), the identity on a replaced parameter. Edits through ``.data``
    bypass all of them: call ``invalidate_cache()`` then."""
    return (id(theta), theta._version, theta.data_ptr(), id(alpha), alpha._version, alpha.data_ptr(),
            theta.device)


def _index_tensor(values: list[int], device: torch.device, cache: Optional[dict]) -> torch.Tensor:
    """A long tensor of ``values``, built from the Python list in one copy (per-element writes into a device
    tensor are one kernel each), or the equal one already in ``cache``. Never written to, so safe to share."""
    key = (device, tuple(values))
    tensor = None if cache is None else cache.get(key)
    if tensor is None:
        tensor = torch.tensor(values, dtype=torch.long, device=device)
        if cache is not None:
            cache[key] = tensor
    return tensor


class AdaptedLinear(nn.Module):
    """``nn.Linear`` wrapper holding named RoAd / LoRA adapters. Parameter names carry the method prefix:
    ``road_theta.<name>``, ``road_alpha.<name>``, ``lora_A.<name>`` ([r, d_in]), ``lora_B.<name>`` ([d_out, r])."""

    def __init__(self, base_layer: nn.Linear, module_name: str) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{module_name}: RoAd/LoRA adapters need an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.module_name = module_name
        self.road_theta = nn.ParameterDict()
        self.road_alpha = nn.ParameterDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: dict[str, LayerAdapterSpec] = {}
        self.active_adapter: Optional[str] = None
        self.merged: Optional[_MergedState] = None
        self._coeff_cache: dict[str, tuple[tuple, dict]] = {}  # name -> (version key, {dtype or None: (c1, s2)})
        # Adapters restricted to a pair subset: bool mask over their road_theta/road_alpha entries (CPU; moved to
        # the parameters' device when applied). Plain attribute, so it never enters a state dict.
        self.pair_masks: dict[str, torch.Tensor] = {}
        self._mixed: Optional[_MixedTables] = None
        self._bank: Optional[_RotationBank] = None

    # -- nn.Linear look-alike attributes, so code that inspects .weight/.in_features keeps working
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def table_dtype(self) -> torch.dtype:
        """The dtype mixed-batch coefficient tables are built in: the layer's compute dtype."""
        return self.base_layer.weight.dtype

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    # -- adapter management
    def add(self, name: str, config: AdapterConfig) -> None:
        """Create identity-initialised fp32 parameters for adapter ``name`` on the base weight's device."""
        if name in self.specs:
            raise AdapterStateError(f"{self.module_name}: adapter {name!r} already exists")
        d_out, d_in = self.out_features, self.in_features
        device = self.base_layer.weight.device
        # fp32 for fp32/bf16/fp16 bases; fp64 bases (numerical tests) get fp64 so nothing rounds to fp32.
        pdtype = torch.float64 if self.base_layer.weight.dtype == torch.float64 else torch.float32
        spec = LayerAdapterSpec(
            variant=config.variant,
            group_size=config.group_size,
            lora_r=config.lora_r if variant_has_lora(config.variant) else 0,
            lora_scale=config.lora_scale if variant_has_lora(config.variant) else 0.0,
            lora_dropout=float(config.lora_dropout) if variant_has_lora(config.variant) else 0.0,
        )
        if variant_has_road(spec.variant):
            size = road_param_size(spec.variant, d_out)
            if config.pairs is not None:
                pairs = config.pairs.pair_mask(d_out // 2, layer=self.module_name)
                self.pair_masks[name] = param_mask(spec.variant, spec.group_size, pairs)
            self.road_theta[name] = nn.Parameter(torch.zeros(size, dtype=pdtype, device=device))
            self.road_alpha[name] = nn.Parameter(torch.ones(size, dtype=pdtype, device=device))
        if spec.lora_r:
            a = torch.empty(spec.lora_r, d_in, dtype=pdtype, device=device)
            if device.type != "meta":
                # Same init as PEFT/LLaVA LoRA: Kaiming-uniform A, zero B -> the update starts at exactly 0.
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(d_out, spec.lora_r, dtype=pdtype, device=device))
        self.specs[name] = spec
        self._coeff_cache.pop(name, None)
        self._bank = None

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` from this layer."""
        for store in (self.road_theta, self.road_alpha, self.lora_A, self.lora_B):
            if name in store:
                del store[name]
        self.specs.pop(name, None)
        self.pair_masks.pop(name, None)
        self._coeff_cache.pop(name, None)
        self._bank = None
        if self.active_adapter == name:
            self.active_adapter = None

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """``{"road_theta": p, ...}`` for one adapter (only the kinds it has)."""
        out = {}
        for kind in ("road_theta", "road_alpha", "lora_A", "lora_B"):
            store = getattr(self, kind)
            if name in store:
                out[kind] = store[name]
        return out

    # -- coefficients
    def road_parameters(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta, alpha)`` of adapter ``name`` as the layer applies them: outside its pair subset (if any) every
        entry is at the identity, whatever the raw parameter holds. Differentiable."""
        theta, alpha = self.road_theta[name], self.road_alpha[name]
        mask = self.pair_masks.get(name)
        if mask is not None and mask.device != theta.device:
            mask = self.pair_masks[name] = mask.to(theta.device)  # once, not a copy per forward
        return masked(theta, alpha, mask)

    def coefficients(self, name: str, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c1, s2)`` of adapter ``name``, computed in the parameters' precision (fp32) and cast to ``dtype`` when
        given; cached (each cast too) while no gradient is being recorded."""
        spec = self.specs[name]
        theta, alpha = self.road_theta[name], self.road_alpha[name]
        if torch.is_grad_enabled() and (theta.requires_grad or alpha.requires_grad):
            c1, s2 = road_coefficients(spec.variant, spec.group_size, *self.road_parameters(name))
            return (c1, s2) if dtype is None else (c1.to(dtype), s2.to(dtype))
        key = _stamp(theta, alpha)
        hit = self._coeff_cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                c1, s2 = road_coefficients(spec.variant, spec.group_size, *self.road_parameters(name))
            hit = self._coeff_cache[name] = (key, {None: (c1, s2)})
        casts = hit[1]
        pair = casts.get(dtype)
        if pair is None:  # a bf16 model's decode step would otherwise pay two cast kernels per layer
            c1, s2 = casts[None]
            pair = casts[dtype] = (c1.to(dtype), s2.to(dtype))
        return pair

    def invalidate_cache(self) -> None:
        """Forget cached coefficient tables (needed only after editing parameters through ``.data``)."""
        self._coeff_cache.clear()
        self._bank = None

    def _lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        spec = self.specs[name]
        a = self.lora_A[name].to(x.dtype)
        b = self.lora_B[name].to(x.dtype)
        if spec.lora_dropout and self.training:
            x = F.dropout(x, p=spec.lora_dropout, training=True)
        return F.linear(F.linear(x, a), b) * spec.lora_scale

    # -- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self._mixed is not None:
            return self._mixed_forward(x, y)
        if self.merged is not None:
            return y
        name = self.active_adapter
        if name is None or name not in self.specs:
            return y
        spec = self.specs[name]
        if spec.lora_r:
            y = y + self._lora_delta(name, x)
        if variant_has_road(spec.variant):
            c1, s2 = self.coefficients(name, y.dtype)
            if torch.is_grad_enabled() and (y.requires_grad or c1.requires_grad):
                y = apply_rotation(y, c1, s2, spec.group_size)
            else:
                # y is this layer's own fresh output (base matmul / LoRA sum), so rotating it in place is safe.
                y = apply_rotation_exact_(y, c1, s2, spec.group_size)
        return y

    # -- mixed batches
    @torch.no_grad()
    def build_mixed_tables(
        self, names: list[Optional[str]], *, dtype: torch.dtype, index_cache: Optional[dict] = None
    ) -> None:
        """Prepare the gathered tables for one batch whose row i uses ``names[i]`` (None = base model).

        Names this layer does not hold map to the identity row (an adapter may target a subset of layers).
        Built once per ``per_sample_adapters`` block, so each decode step is one fused multiply-add pass.
        Inference only: the tables are detached from the adapter parameters. ``index_cache``, a dict shared by the
        layers of one block, lets layers with the same row indices (normally all of them) share those tensors.
        """
        if self.merged is not None:
            raise AdapterStateError(
                f"{self.module_name}: adapter {self.merged.name!r} is merged; unmerge it before mixed-adapter batches"
            )
        device = self.base_layer.weight.device
        present = [n for n in dict.fromkeys(names) if n is not None and n in self.specs]
        row_of = {n: i + 1 for i, n in enumerate(present)}
        ids = _index_tensor([row_of.get(n, 0) if n is not None else 0 for n in names], device, index_cache)

        bank = self._rotation_bank([n for n in present if variant_has_road(self.specs[n].variant)])
        rotations = []
        # One pass per distinct group_size among the batch's adapters (normally exactly one); rows of other group
        # sizes stay identity in that pass.
        for gs in sorted({bank.rows[n][0] for n in present if n in bank.rows}):
            c1_t, s2_t = self._bank_tables(bank, gs, dtype)
            rows = [bank.rows[n][1] if bank.rows.get(n, (None,))[0] == gs else 0 for n in names]
            rotations.append((gs, _index_tensor(rows, device, index_cache), c1_t, s2_t))

        lora_a = lora_b = None
        lora_names = [n for n in present if self.specs[n].lora_r]
        if lora_names:
            r_max = max(self.specs[n].lora_r for n in lora_names)
            lora_a = torch.zeros(len(present) + 1, r_max, self.in_features, dtype=dtype, device=device)
            lora_b = torch.zeros(len(present) + 1, self.out_features, r_max, dtype=dtype, device=device)
            for n in lora_names:
                lora_a[row_of[n]] = self._padded_a(n, r_max, dtype)
                lora_b[row_of[n]] = self._padded_b(n, r_max, dtype)
        self._mixed = _MixedTables(ids=ids, rotations=rotations, lora_a=lora_a, lora_b=lora_b, by_shape={})

    def _rotation_bank(self, names: list[str]) -> _RotationBank:
        """This layer's :class:`_RotationBank`, rebuilt when an adapter was added or removed (both drop it) or one of
        ``names``, the batch's RoAd adapters, changed (see :func:`_stamp`). Adapters outside the batch are checked
        when a batch uses them."""
        # The ParameterDicts' own name -> Parameter dicts: their __getitem__ costs ~1 us a name, and this runs for
        # every adapted layer each time a batch's adapter set changes.
        thetas, alphas = self.road_theta._parameters, self.road_alpha._parameters
        bank = self._bank
        if bank is not None and all(bank.stamps.get(n) == _stamp(thetas[n], alphas[n]) for n in names):
            return bank
        rows: dict[str, tuple[int, int]] = {}
        counts: dict[int, int] = {}
        for n in thetas:
            gs = self.specs[n].group_size
            counts[gs] = counts.get(gs, 0) + 1
            rows[n] = (gs, counts[gs])
        stamps = {n: _stamp(t, alphas[n]) for n, t in thetas.items()}
        bank = self._bank = _RotationBank(stamps=stamps, rows=rows, tables={})
        return bank

    def _bank_tables(self, bank: _RotationBank, gs: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c1, s2)`` of every adapter with group size ``gs`` in ``dtype``, [1 + n, d_out], built on first use."""
        tables = bank.tables.get((gs, dtype))
        if tables is None:
            names = sorted((row, n) for n, (g, row) in bank.rows.items() if g == gs)
            pairs = [self.coefficients(n) for _, n in names]
            ident_c1, ident_s2 = identity_coefficients(self.out_features, dtype=pairs[0][0].dtype,
                                                       device=pairs[0][0].device)
            c1_t = torch.stack([ident_c1] + [c1 for c1, _ in pairs]).to(dtype)
            s2_t = torch.stack([ident_s2] + [s2 for _, s2 in pairs]).to(dtype)
            tables = bank.tables[(gs, dtype)] = (c1_t, s2_t)
        return tables

    def _padded_a(self, name: str, r_max: int, dtype: torch.dtype) -> torch.Tensor:
        a = self.lora_A[name].to(dtype)
        return F.pad(a, (0, 0, 0, r_max - a.shape[0]))

    def _padded_b(self, name: str, r_max: int, dtype: torch.dtype) -> torch.Tensor:
        b = self.lora_B[name].to(dtype) * self.specs[name].lora_scale
        return F.pad(b, (0, r_max - b.shape[1]))

    def clear_mixed_tables(self) -> None:
        """Leave mixed-batch mode."""
        self._mixed = None

    def _rows_for(self, batch: int, ndim: int, dtype: torch.dtype) -> tuple:
        """``(ids, [(group_size, c1, s2), ...])`` for a [batch, ..., d_out] activation of ``ndim`` dims and
        ``dtype``: each row's coefficients gathered, cast and shaped to broadcast against it, once per block."""
        mixed = self._mixed
        n = mixed.ids.shape[0]
        if batch % n:
            raise AdapterStateError(
                f"{self.module_name}: per_sample_adapters got {n} adapter names but the layer sees a batch of "
                f"{batch} rows (not a multiple of {n}); pass one name per batch row"
            )
        repeat = batch // n  # generate(num_return_sequences=k) / beams repeat_interleave every row k times

        def expand(rows: torch.Tensor) -> torch.Tensor:
            return rows if repeat == 1 else rows.repeat_interleave(repeat)

        # Names are fixed for the whole block, so each row's coefficients are gathered once per activation shape
        # and every decode step is a single fused pass with nothing to look up, cast or reshape: at small widths
        # those per-call steps cost more than the rotation itself. Memory: 2 x batch x d_out per layer in the
        # activation dtype (for LLaVA-7B, batch 32, bf16: ~170 MB in all, next to gigabytes of KV cache).
        view = (batch,) + (1,) * (ndim - 2) + (self.out_features,)
        rotations = []
        for gs, rows, c1_t, s2_t in mixed.rotations:
            rows = expand(rows)
            rotations.append((gs, c1_t.index_select(0, rows).to(dtype).reshape(view),
                              s2_t.index_select(0, rows).to(dtype).reshape(view)))
        return expand(mixed.ids), rotations

    def _mixed_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mixed = self._mixed
        key = (y.shape[0], y.dim(), y.dtype)
        entry = mixed.by_shape.get(key)
        if entry is None:
            entry = mixed.by_shape[key] = self._rows_for(*key)
        ids, rotations = entry
        if mixed.lora_a is not None:
            # LoRA stacks are gathered per call (not cached): [batch, r, d_in] per layer would cost far more memory.
            batch = y.shape[0]
            x3 = x.reshape(batch, -1, x.shape[-1])
            a = mixed.lora_a.index_select(0, ids).to(x.dtype)  # [B, r, d_in]
            b = mixed.lora_b.index_select(0, ids).to(x.dtype)  # [B, d_out, r]
            delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))
            y = y + delta.reshape(y.shape)
        # y is this layer's own fresh output (base matmul / LoRA sum), so rotating it in place is safe.
        rotate = apply_rotation if y.requires_grad and torch.is_grad_enabled() else apply_rotation_fused_
        for gs, c1, s2 in rotations:
            y = rotate(y, c1, s2, gs)
        return y

    # -- merge / unmerge
    def _work_weight(self) -> tuple[torch.Tensor, bool]:
        """The weight in the merge precision (fp32, or fp64 for fp64 weights): the parameter itself when it
        already has that dtype (updated in place, no full copy), else an upcast copy."""
        weight = self.base_layer.weight.detach()
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if weight.dtype == work and weight.is_contiguous():
            return weight, True
        return weight.to(work).contiguous(), False

    def check_mergeable(self, name: str) -> None:
        """Raise if adapter ``name`` cannot be folded into this layer's base weights (a quantized base: bnb.py)."""

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight/bias: W' = R (W0 + s B A), b' = R b (row-wise)."""
        self.check_mergeable(name)
        if self.merged is not None:
            raise AdapterStateError(f"{self.module_name}: adapter {self.merged.name!r} is already merged")
        spec = self.specs[name]
        bias = self.base_layer.bias
        w, in_place = self._work_weight()
        factors = None
        if spec.lora_r:
            a = self.lora_A[name].detach().clone()
            b = self.lora_B[name].detach().clone()
            factors = (a, b, spec.lora_scale)
            w.addmm_(b.to(w.dtype), a.to(w.dtype), alpha=spec.lora_scale)
        c1 = s2 = None
        if variant_has_road(spec.variant):
            theta, alpha = (t.detach().to(w.dtype) for t in self.road_parameters(name))
            c1, s2 = road_coefficients(spec.variant, spec.group_size, theta, alpha)
            rotate_rows_(w, c1, s2, spec.group_size)
            if bias is not None:
                bias.copy_(apply_rotation(bias.detach().to(w.dtype), c1, s2, spec.group_size).to(bias.dtype))
        if not in_place:
            self.base_layer.weight.copy_(w)
        self.merged = _MergedState(name=name, c1=c1, s2=s2, group_size=spec.group_size, lora_delta_factors=factors)

    def check_unmergeable(self) -> None:
        """Raise (naming the layer and pair) if the merged rotation has a singular 2x2 block."""
        st = self.merged
        if st is None or st.c1 is None:
            return
        bad = singular_pairs(st.c1, st.s2, st.group_size)
        if bad.numel():
            half = st.group_size // 2
            p = int(bad[0])
            j = (p // half) * st.group_size + p % half
            raise AdapterStateError(
                f"{self.module_name}: cannot unmerge adapter {st.name!r}: {bad.numel()} singular 2x2 rotation "
                f"block(s), first between output dims {j} and {j + half} (scale alpha ~ 0?)"
            )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 = R^-1 W' - s B A and b = R^-1 b' with the analytic 2x2 inverses."""
        st = self.merged
        if st is None:
            raise AdapterStateError(f"{self.module_name}: nothing is merged")
        self.check_unmergeable()
        bias = self.base_layer.bias
        w, in_place = self._work_weight()
        if st.c1 is not None:
            c1_inv, s2_inv, _ = invert_coefficients(st.c1.to(w.dtype), st.s2.to(w.dtype), st.group_size)
            rotate_rows_(w, c1_inv, s2_inv, st.group_size)
            if bias is not None:
                bias.copy_(apply_rotation(bias.detach().to(w.dtype), c1_inv, s2_inv, st.group_size).to(bias.dtype))
        if st.lora_delta_factors is not None:
            a, b, scale = st.lora_delta_factors
            w.addmm_(b.to(w.dtype), a.to(w.dtype), alpha=-scale)
        if not in_place:
            self.base_layer.weight.copy_(w)
        self.merged = None

    def extra_repr(self) -> str:
        return f"adapters={list(self.specs)}, active={self.active_adapter!r}, merged={self.merged is not None}"
