"""The adapter engine: RoAd (road1/road2/road4), LoRA and the RoAd1+LoRA hybrid on LLaVA's language model.

This room knows nothing about data, training or serving; every workflow builds, switches, merges and batches
adapters through it. Its modules, each with one job:

- ``config.py``: ``AdapterConfig`` (variant, group size, targets, LoRA rank, pair subset) and its validation;
- ``errors.py``: the error types; ``pairs.py``: pair subsets; ``rotation.py``: RoAd math on tensors;
- ``layer.py``: the adapted Linear (single, merged and mixed-batch paths); ``bank.py``: each layer's coefficient
  bank, the one source of those paths' rotations; ``mixed.py``: the row indices and tables of a mixed batch;
- ``inject.py``: wrapping the language model's targets, switching, merging, ``per_sample_adapters``;
- ``io.py``: adapter directories (road_vlm and PEFT RoAd formats); ``compose.py``: composing disjoint adapters;
  ``bnb.py``: adapters on bitsandbytes-quantized linears.
"""

from .config import DEFAULT_TARGET_MODULES, VARIANTS, AdapterConfig
from .errors import AdapterConfigError, AdapterFileError, AdapterStateError
from .inject import (
    add_adapter,
    adapted_layers,
    delete_adapter,
    merge_adapter,
    per_sample_adapters,
    refresh_coefficients,
    set_active_adapter,
    trainable_parameters,
    unload_adapters,
    unmerge_adapter,
)
from .io import load_adapter, read_adapter_config, save_adapter
from .layer import AdaptedLinear

__all__ = [
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterFileError",
    "AdapterStateError",
    "AdaptedLinear",
    "DEFAULT_TARGET_MODULES",
    "VARIANTS",
    "add_adapter",
    "adapted_layers",
    "delete_adapter",
    "load_adapter",
    "merge_adapter",
    "per_sample_adapters",
    "read_adapter_config",
    "refresh_coefficients",
    "save_adapter",
    "set_active_adapter",
    "trainable_parameters",
    "unload_adapters",
    "unmerge_adapter",
]
