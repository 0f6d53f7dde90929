"""``DataConfig``: the training data settings (the ``data:`` section of a training config), one object that the
indexer, the dataset and the trainer all read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from road_vlm.data.template import ImageAspectRatio, Template

OnBadImage = Literal["error", "skip"]  # skip: the sample is counted and supervises nothing
ON_BAD_IMAGE: tuple[str, ...] = get_args(OnBadImage)


@dataclass
class DataConfig:
    """``data:`` section."""

    path: str = ""  # LLaVA instruction data: a JSON array or JSONL file (required)
    image_folder: str | None = None  # images are relative to this folder; default: the data file's folder
    max_length: int = 2048  # tokens per sample after <image> expansion (LLaVA's model_max_length)
    template: Template = "vicuna_v1"  # conversation template: vicuna_v1 (LLaVA-1.5 "v1") or plain (stage 1)
    image_aspect_ratio: ImageAspectRatio = "pad"  # pad (LLaVA-1.5 expand2square) | crop (bare CLIP processor)
    group_by_modality_length: bool = False  # LLaVA's modality-grouped sampler (mixed image/text data only)
    on_bad_image: OnBadImage = "error"  # error | skip (skipped samples are counted and reported)
    allow_images_outside_folder: bool = False  # image paths may leave image_folder (.., absolute, symlinks)
    num_workers: int = 0  # DataLoader worker processes (image decoding)

    def __post_init__(self) -> None:
        # The one check of on_bad_image: the template and the aspect ratio are checked where they are used.
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"data.on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {self.on_bad_image!r}")

    @property
    def image_dir(self) -> Path:
        """The folder image paths are relative to."""
        return Path(self.image_folder) if self.image_folder is not None else Path(self.path).parent
