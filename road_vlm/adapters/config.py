"""AdapterConfig: what kind of adapter to attach and where.

Fields (the training YAML's ``adapter:`` section uses exactly these names):

- ``variant``: ``"road1" | "road2" | "road4"`` (RoAd with d_out, 2*d_out or 4*d_out parameters per layer),
  ``"lora"`` (y = W0 h + (lora_alpha/lora_r) * B A h + b) or ``"road1_lora"`` (hybrid: z = R (W0 h + s B A h + b)).
- ``group_size``: RoAd pairing group (even; must divide every targeted layer's d_out). Inside a group, element
  j pairs with element j + group_size/2 (the PEFT layout, so RoAd files interoperate with PEFT).
- ``target_modules``: a list of module-name suffixes (``"q_proj"`` or ``"self_attn.q_proj"``) or one regular
  expression string matched with ``re.fullmatch`` against the full module name
  (e.g. ``r"model\\.language_model\\.layers\\.(0|1)\\.self_attn\\.(q|v)_proj"``). Only ``nn.Linear`` modules of the
  *language model* are ever adapted, whatever the pattern says.
- ``lora_r``, ``lora_alpha``, ``lora_dropout``: LoRA rank, scale numerator and input dropout (used by ``lora`` and
  ``road1_lora``; ``lora_r`` must be positive for every variant so that configs stay valid when switched).
- ``train_projector``: also train the multimodal projector and save it as ``projector.safetensors``.
- ``pair_subset``, ``pair_layout``: restrict the RoAd rotation to a subset of every layer's pairs of output dims
  (``"k/n"``: the k-th of n slices, ``"interleaved"`` or ``"contiguous"``; see ``pairs.py``). The other pairs stay
  exactly identity through training, and adapters on disjoint subsets compose (``road-vlm compose``). Not for
  ``lora``; the hybrid's LoRA part is not restricted, so hybrids train on a subset but do not compose.

``variant: "none"`` adapts no layer: with ``train_projector: true`` it is LLaVA's stage 1 (only the projector
trains; ``configs/llava15_7b_pretrain.yaml``), and its checkpoint is a projector file that ``road-vlm build-base
--projector`` takes.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from .errors import AdapterConfigError
from .pairs import PAIR_LAYOUTS, PairSubset

VARIANTS: tuple[str, ...] = ("road1", "road2", "road4", "lora", "road1_lora", "none")
ROAD_VARIANTS: tuple[str, ...] = ("road1", "road2", "road4")
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# road_vlm variant name <-> PEFT RoadConfig.variant
PEFT_VARIANT = {"road1": "road_1", "road2": "road_2", "road4": "road_4"}
FROM_PEFT_VARIANT = {v: k for k, v in PEFT_VARIANT.items()}


def variant_has_road(variant: str) -> bool:
    """Whether the variant carries a RoAd rotation."""
    return variant in ROAD_VARIANTS or variant == "road1_lora"


def variant_adapts_layers(variant: str) -> bool:
    """Whether the variant wraps language-model layers at all (``none``: projector only)."""
    return variant != "none"


def variant_has_lora(variant: str) -> bool:
    """Whether the variant carries a LoRA low-rank update."""
    return variant in ("lora", "road1_lora")


@dataclass
class AdapterConfig:
    """Configuration of one adapter (see the module docstring for the meaning of each field)."""

    variant: str = "road4"
    group_size: int = 64
    target_modules: Union[list[str], str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    lora_r: int = 128
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05
    train_projector: bool = False
    pair_subset: Optional[str] = None
    pair_layout: str = "interleaved"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise AdapterConfigError on any field that cannot work, independent of a model."""
        if self.variant not in VARIANTS:
            raise AdapterConfigError(f"unknown adapter variant {self.variant!r}; expected one of {list(VARIANTS)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise AdapterConfigError(f"group_size must be an int, got {self.group_size!r}")
        if self.group_size <= 0 or self.group_size % 2 != 0:
            raise AdapterConfigError(f"group_size must be a positive even number, got {self.group_size}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r <= 0:
            raise AdapterConfigError(f"lora_r must be a positive int, got {self.lora_r!r}")
        if (not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool)
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0):
            raise AdapterConfigError(f"lora_alpha must be a positive finite number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= float(self.lora_dropout) < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.train_projector, bool):
            raise AdapterConfigError(f"train_projector must be true/false, got {self.train_projector!r}")
        if self.variant == "none" and not self.train_projector:
            raise AdapterConfigError("variant 'none' adapts no layer, so it trains nothing unless train_projector "
                                     "is true (LLaVA's stage 1)")
        if self.pair_subset is not None:
            if not variant_has_road(self.variant):
                raise AdapterConfigError(f"pair_subset restricts a RoAd rotation; variant {self.variant!r} has none")
            self.pair_subset = str(PairSubset.parse(self.pair_subset, self.pair_layout))  # canonical "1,3/4"
        elif self.pair_layout not in PAIR_LAYOUTS:
            raise AdapterConfigError(f"pair_layout must be one of {list(PAIR_LAYOUTS)}, got {self.pair_layout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise AdapterConfigError("target_modules regex is empty")
            try:
                re.compile(targets)
            except re.error as exc:
                raise AdapterConfigError(f"target_modules is not a valid regex {targets!r}: {exc}") from exc
        elif isinstance(targets, (list, tuple)):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise AdapterConfigError(f"target_modules must be a non-empty list of names, got {targets!r}")
            self.target_modules = list(targets)
        else:
            raise AdapterConfigError(f"target_modules must be a list of names or a regex string, got {targets!r}")

    @property
    def pairs(self) -> Optional[PairSubset]:
        """The parsed :class:`~road_vlm.adapters.pairs.PairSubset`, or None when every pair may change."""
        return None if self.pair_subset is None else PairSubset.parse(self.pair_subset, self.pair_layout)

    @property
    def lora_scale(self) -> float:
        """LoRA output scale s = lora_alpha / lora_r."""
        return float(self.lora_alpha) / float(self.lora_r)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serialisable dict with exactly the dataclass field names."""
        out = asdict(self)
        if isinstance(out["target_modules"], tuple):
            out["target_modules"] = list(out["target_modules"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build from a dict (e.g. the ``adapter:`` section of a YAML config); unknown keys are an error."""
        if not isinstance(data, dict):
            raise AdapterConfigError(f"adapter config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterConfigError(f"unknown adapter config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)
