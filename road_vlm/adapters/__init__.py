"""road_vlm adapter engine: RoAd (road1/road2/road4), LoRA and the RoAd1+LoRA hybrid on LLaVA's language model.

See ``config.py`` for the configuration fields and ``io.py`` for the adapter directory format.
"""

from .config import DEFAULT_TARGET_MODULES, VARIANTS, AdapterConfig, AdapterConfigError
from .inject import (
    add_adapter,
    adapted_layers,
    delete_adapter,
    merge_adapter,
    per_sample_adapters,
    set_active_adapter,
    trainable_parameters,
    unload_adapters,
    unmerge_adapter,
)
from .io import AdapterFileError, load_adapter, read_adapter_config, save_adapter
from .layer import AdaptedLinear, AdapterStateError

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
    "save_adapter",
    "set_active_adapter",
    "trainable_parameters",
    "unload_adapters",
    "unmerge_adapter",
]
