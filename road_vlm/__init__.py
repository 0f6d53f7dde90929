"""road_vlm: LLaVA-1.5 finetuning with RoAd (2D rotary adaptation), DeepSpeed training, benchmark evaluation,
image chat and one-batch serving of many adapters.

The public API is re-exported here. Attributes resolve lazily (PEP 562) so that ``import road_vlm`` and
``road-vlm --help`` stay fast; ``from road_vlm import add_adapter`` works as usual.
"""

from __future__ import annotations

from road_vlm.lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterConfig": "road_vlm.adapters",
    "add_adapter": "road_vlm.adapters",
    "save_adapter": "road_vlm.adapters",
    "load_adapter": "road_vlm.adapters",
    "merge_adapter": "road_vlm.adapters",
    "unmerge_adapter": "road_vlm.adapters",
    "set_active_adapter": "road_vlm.adapters",
    "per_sample_adapters": "road_vlm.adapters",
    "trainable_parameters": "road_vlm.adapters",
    "load_vlm": "road_vlm.model",
    "LoadedVLM": "road_vlm.model",
    "PromptFormat": "road_vlm.data.template",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return __all__
