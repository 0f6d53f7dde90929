"""The adapted Linear: a frozen base ``nn.Linear`` plus any number of named adapters.

Forward paths:
- single adapter (the active one): ``z = R (W0 h + s B A h + b)`` with R and/or the LoRA part present per variant;
- merged: the adapter lives in the base weights, the layer is the bare base layer;
- composed training (``inject.set_composition``): after the active adapter, each *partner* adapter rotates the
  output with its current values and no gradient; *idle* adapters take no part. Both join the autograd graph with
  weight zero, so every trainable adapter gets a gradient (of zero where it did not act) on every rank;
- mixed batch (inside ``per_sample_adapters``): every batch row picks an adapter (or none). The rotation is one
  gather from the layer's coefficient bank (``bank.py``, row 0 = identity) plus one element-wise pass over the
  whole batch; the LoRA parts of lora/hybrid adapters are one gathered ``bmm`` with ranks padded to the largest.

Where the rotation's coefficients come from: while training (``module.train()``), or whenever autograd must see the
adapter parameters, they are computed from the live parameters on every forward. Otherwise (inference) they are
read from the bank, which is written from the parameters when an adapter is added or loaded, on ``eval()``, on
``load_state_dict`` and on ``Module.to``/``_apply``. Editing adapter parameters in place any other way while in
eval mode (a manual ``copy_``, an optimizer step in eval mode) must be followed by :meth:`refresh_coefficients`.

Dtypes: adapter parameters are created in fp32 (small, and angles need the precision) even on a bf16/fp16 base
(fp64 on an fp64 base). Coefficients are computed in the parameters' precision (the bank's in fp32 at least) and
cast to the activation dtype; the element-wise rotation and the LoRA matmuls run in the activation dtype (bf16 on
GPU), which keeps the decode path a gather plus one multiply-add pass with no up/down casts of the activation. (A
later ``model.to(bf16)``, or DeepSpeed's bf16 mode, casts adapter parameters like any other; DeepSpeed then keeps
fp32 master copies in the optimizer.) Merging is computed in fp32 (or fp64 for fp64 weights) and cast back to the
weight dtype once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bank import CoefficientBank
from .config import AdapterConfig, variant_has_lora, variant_has_road
from .errors import AdapterStateError
from .mixed import BatchRows, MixedTables, batch_rows, lora_stacks
from .pairs import masked, param_mask
from .rotation import (
    apply_rotation,
    apply_rotation_exact_,
    apply_rotation_fused_,
    invert_coefficients,
    road_coefficients,
    road_param_size,
    rotate_rows_,
    singular_pairs,
)
from .triton_rotation import fused_rotation_applies, rotate_mixed


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
        self.partners: tuple[str, ...] = ()  # composed after the active adapter, gradient cut (set_composition)
        self.idle: tuple[str, ...] = ()  # trained in this run, off in this batch (set_composition)
        self.merged: Optional[_MergedState] = None
        self.bank = CoefficientBank(base_layer.out_features)
        self._unwritten: set[str] = set()  # RoAd adapters whose bank rows wait for their parameters (next read)
        # Adapters restricted to a pair subset: bool mask over their road_theta/road_alpha entries (CPU; moved to
        # the parameters' device when applied). Plain attribute, so it never enters a state dict.
        self.pair_masks: dict[str, torch.Tensor] = {}
        self._mixed: Optional[MixedTables] = None

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
    def add(self, name: str, config: AdapterConfig, row: Optional[int] = None) -> None:
        """Create identity-initialised fp32 parameters for adapter ``name`` on the base weight's device, in bank row
        ``row`` (default: the lowest free one; ``inject.py`` passes the adapter's model-wide slot)."""
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
            self.bank.reserve(name, row)
            self._unwritten.add(name)
        if spec.lora_r:
            a = torch.empty(spec.lora_r, d_in, dtype=pdtype, device=device)
            if device.type != "meta":
                # Same init as PEFT/LLaVA LoRA: Kaiming-uniform A, zero B -> the update starts at exactly 0.
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(d_out, spec.lora_r, dtype=pdtype, device=device))
        self.specs[name] = spec

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` from this layer."""
        for store in (self.road_theta, self.road_alpha, self.lora_A, self.lora_B):
            if name in store:
                del store[name]
        self.specs.pop(name, None)
        self.pair_masks.pop(name, None)
        self.bank.release(name)
        self._unwritten.discard(name)
        if self.active_adapter == name:
            self.active_adapter = None
        self.partners = tuple(n for n in self.partners if n != name)
        self.idle = tuple(n for n in self.idle if n != name)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """``{"road_theta": p, ...}`` for one adapter (only the kinds it has)."""
        out = {}
        for kind in ("road_theta", "road_alpha", "lora_A", "lora_B"):
            store = getattr(self, kind)
            if name in store:
                out[kind] = store[name]
        return out

    @torch.no_grad()
    def set_adapter_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy values into adapter ``name``'s parameters (``{"road_theta": t, ...}``, any subset of its kinds) and
        rewrite its bank row: how loaders and compositions fill an adapter."""
        params = self.adapter_parameters(name)
        for kind, value in tensors.items():
            params[kind].copy_(value.to(params[kind].dtype))
        self.refresh_coefficients(name)

    def refresh_coefficients(self, name: Optional[str] = None) -> None:
        """Rewrite the bank row of adapter ``name`` (default: every adapter) from its parameters, at its next read.

        Needed only after editing adapter parameters in place while in eval mode; adding, loading, ``eval()``,
        ``load_state_dict`` and ``Module.to`` call it themselves."""
        names = self.road_theta.keys() if name is None else [name] if name in self.road_theta else []
        self._unwritten.update(names)

    def train(self, mode: bool = True) -> "AdaptedLinear":
        super().train(mode)
        if not mode:  # training stepped the parameters without telling the bank
            self.refresh_coefficients()
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)  # may swap the parameters' storage (device, dtype)
        self.refresh_coefficients()
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_coefficients()  # the ParameterDicts below load next; rows are rewritten when next read

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
        """``(c1, s2)`` of adapter ``name``, in the parameters' precision or cast to ``dtype``: computed from the
        parameters (differentiable) while training or when autograd needs them, else read from the bank."""
        theta, alpha = self.road_theta[name], self.road_alpha[name]
        if self.training or (torch.is_grad_enabled() and (theta.requires_grad or alpha.requires_grad)):
            spec = self.specs[name]
            c1, s2 = road_coefficients(spec.variant, spec.group_size, *self.road_parameters(name))
            return (c1, s2) if dtype is None else (c1.to(dtype), s2.to(dtype))
        if name in self._unwritten:
            self._write_bank(name)
        return self.bank.coefficients(name, dtype)

    @torch.no_grad()
    def _write_bank(self, name: str) -> None:
        """Compute adapter ``name``'s coefficients from its parameters, in fp32 at least, into its bank row."""
        spec = self.specs[name]
        theta, alpha = self.road_parameters(name)
        work = torch.promote_types(theta.dtype, torch.float32)
        self.bank.write(name, *road_coefficients(spec.variant, spec.group_size, theta.to(work), alpha.to(work)))
        self._unwritten.discard(name)

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
        y = self._active_forward(x, y, self.active_adapter)
        if self.partners or self.idle:
            y = self._partners_forward(y)
        return y

    def _active_forward(self, x: torch.Tensor, y: torch.Tensor, name: Optional[str]) -> torch.Tensor:
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

    def _partners_forward(self, y: torch.Tensor) -> torch.Tensor:
        """Partners rotate ``y`` with their current values (their pairs are disjoint from the active adapter's, so
        the order does not matter); partners and idle adapters add ``0 x`` their coefficients, so a trainable one
        still gets a (zero) gradient: ZeRO reduces the same gradients on every rank whichever adapters acted."""
        zero = None
        for name in (*self.partners, *self.idle):
            spec = self.specs.get(name)
            if spec is None:  # this adapter skips this layer
                continue
            c1, s2 = self.coefficients(name, y.dtype)
            if c1.requires_grad:
                term = (c1.sum() + s2.sum()) * 0.0
                zero = term if zero is None else zero + term
            if name in self.partners:
                y = apply_rotation(y, c1.detach(), s2.detach(), spec.group_size)
        return y if zero is None else y + zero

    # -- mixed batches
    @torch.no_grad()
    def build_mixed_tables(
        self, names: list[Optional[str]], *, dtype: torch.dtype, rows: Optional[BatchRows] = None
    ) -> None:
        """Prepare the tables for one batch whose row i uses ``names[i]`` (None = base model).

        ``rows``: the batch's bank rows, built once for every layer (``inject.per_sample_adapters``); by default
        from this layer's own bank. Names this layer does not hold read the identity (an adapter may target a
        subset of layers). Inference only: the tables are detached from the adapter parameters.
        """
        if self.merged is not None:
            raise AdapterStateError(
                f"{self.module_name}: adapter {self.merged.name!r} is merged; unmerge it before mixed-adapter batches"
            )
        present = [n for n in dict.fromkeys(names) if n is not None and n in self.specs]
        if rows is None:
            specs = {n: self.specs[n] for n in present}
            rows = batch_rows(names, self.bank.rows, {n: s.group_size for n, s in specs.items()
                                                      if variant_has_road(s.variant)},
                              [n for n, s in specs.items() if s.lora_r])
        rows = rows.on(self.base_layer.weight.device)
        for n in present:
            if n in self._unwritten:
                self._write_bank(n)
        self.bank.ensure_capacity(rows.max_row)
        held = {self.specs[n].group_size for n in present if variant_has_road(self.specs[n].variant)}
        c1_t, s2_t = self.bank.tables(dtype)
        rotations = [(gs, index, c1_t, s2_t) for gs, index in rows.rotations if gs in held]

        # Each LoRA row of the batch: (A, B with its scale folded in), or None where this layer lacks the adapter.
        loras = [(self.lora_A[n], self.lora_B[n].to(dtype) * self.specs[n].lora_scale)
                 if n in self.specs and self.specs[n].lora_r else None for n in rows.lora_names]
        self._mixed = MixedTables(len(rows.names), self.out_features, rotations, rows.lora_ids,
                                  *lora_stacks(loras, dtype))

    def clear_mixed_tables(self) -> None:
        """Leave mixed-batch mode."""
        self._mixed = None

    def _mixed_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mixed = self._mixed
        batch = y.shape[0]
        if batch % mixed.batch:
            raise AdapterStateError(
                f"{self.module_name}: per_sample_adapters got {mixed.batch} adapter names but the layer sees a batch "
                f"of {batch} rows (not a multiple of {mixed.batch}); pass one name per batch row"
            )
        lora_ids, rotations = mixed.rows_for(batch, y.dim(), y.dtype)
        if mixed.lora_a is not None:
            # LoRA stacks are gathered per call (not kept): [batch, r, d_in] per layer would cost far more memory.
            x3 = x.reshape(batch, -1, x.shape[-1])
            a = mixed.lora_a.index_select(0, lora_ids).to(x.dtype)  # [B, r, d_in]
            b = mixed.lora_b.index_select(0, lora_ids).to(x.dtype)  # [B, d_out, r]
            delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))
            y = y + delta.reshape(y.shape)
        c1_bank, s2_bank = self.bank.tables()
        if fused_rotation_applies(y, c1_bank):  # CUDA inference: one Triton launch per rotation pass
            for gs, index, _, _ in mixed.rotations:
                y = rotate_mixed(y, index, c1_bank, s2_bank, gs, mixed.batch)
            return y
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
            self._write_bank(name)  # from the parameters as they are now, whatever the mode
            c1, s2 = (t.to(w.dtype, copy=True) for t in self.bank.coefficients(name))  # copies: kept for unmerge
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
