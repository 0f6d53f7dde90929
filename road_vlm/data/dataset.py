"""The training dataset: indexed LLaVA samples, tokenised and their images decoded on access (as LLaVA's own).

Tokenising and image *decoding* happen in ``__getitem__`` (in DataLoader workers), so indexing a large file up
front stays cheap in time and memory (``road_vlm.data.indexing``; scripts/bench_data.py measures it). Text beyond
``max_length`` is truncated as LLaVA does and the item says so (``truncated``, counted by the trainer); a sample
left with no answer token after truncation, or whose image cannot be read with ``on_bad_image="skip"``, keeps its
shape but supervises nothing (``skipped``, counted), so every rank still sees the same number of samples. An
unreadable image is otherwise an error naming the sample.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from road_vlm.data.config import DataConfig
from road_vlm.data.images import ImageLoadError, load_image, preprocess_images
from road_vlm.data.indexing import DataStats, Tokenization, index_shard, merge_shards
from road_vlm.data.records import DataError
from road_vlm.data.template import IGNORE_INDEX, LabelingError, encode_training_sample

logger = logging.getLogger(__name__)


class LazySupervisedDataset(torch.utils.data.Dataset):
    """Validated LLaVA records (a ``datasets.Dataset``): tokenised and their images decoded on access.

    ``LazySupervisedDataset(data, tokenization, image_processor)`` indexes the whole of ``data.path`` in this
    process; training processes build it with ``from_samples`` from shards indexed in parallel (``index_shard``).
    """

    def __init__(self, data: DataConfig, tokenization: Tokenization, image_processor: Any) -> None:
        samples, stats = merge_shards([index_shard(data, tokenization)], data.path)
        self._setup(samples, stats, data, tokenization, image_processor)

    @classmethod
    def from_samples(cls, samples: Any, stats: DataStats, data: DataConfig, tokenization: Tokenization,
                     image_processor: Any) -> LazySupervisedDataset:
        """Wrap already indexed samples (``merge_shards`` output)."""
        self = cls.__new__(cls)
        self._setup(samples, stats, data, tokenization, image_processor)
        return self

    def _setup(self, samples: Any, stats: DataStats, data: DataConfig, tokenization: Tokenization,
               image_processor: Any) -> None:
        self.data = data
        self.image_dir = data.image_dir
        self.tokenization = tokenization
        self.image_processor = image_processor
        self.stats = stats
        # Arrow-backed storage keeps hundreds of thousands of records compact and shareable with DataLoader workers.
        self.samples = samples
        self._images: list[str | None] = list(samples["image"])
        self.has_image: list[bool] = [image is not None for image in self._images]
        self._ids: list[str] = list(samples["id"])
        self.modality_lengths: list[int] = list(samples["modality_length"])

    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, index: int) -> str:
        return self._ids[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.samples[index]
        t, data = self.tokenization, self.data
        has_image = row["image"] is not None
        try:
            encoded = encode_training_sample(
                t.tokenizer, json.loads(row["conversations"]), has_image=has_image,
                num_image_tokens=t.num_image_tokens, image_token_id=t.image_token_id, max_length=data.max_length,
                template=data.template, require_supervised=False,
            )
        except LabelingError as err:  # index_shard checked what can fail here; a changed setting could not be
            raise DataError(f"{data.path} (id {row['id']}): {err}") from err
        input_ids = torch.tensor(encoded.input_ids, dtype=torch.long)
        labels = torch.tensor(encoded.labels, dtype=torch.long)
        # Truncation left no answer token: the sample keeps its shape and supervises nothing (counted as skipped).
        skipped = bool((labels == IGNORE_INDEX).all())
        pixel_values = None
        if has_image:
            path = self.image_dir / row["image"]
            try:
                image = load_image(path)
            except ImageLoadError as err:
                if data.on_bad_image == "error":
                    raise DataError(f"{data.path} (id {row['id']}): {err}") from err
                # Keep the image tokens (and so the batch shape) but supervise nothing: the sample is skipped
                # without changing how many samples each rank sees, so distributed steps stay in lockstep.
                logger.warning("%s (id %s): skipping unreadable image: %s", data.path, row["id"], err)
                image = None
                skipped = True
                labels = torch.full_like(labels, IGNORE_INDEX)
            if image is None:
                size = _processor_size(self.image_processor)
                pixel_values = torch.zeros(3, size, size)
            else:
                pixel_values = preprocess_images(self.image_processor, [image], data.image_aspect_ratio)[0]
        return {"id": row["id"], "input_ids": input_ids, "labels": labels, "pixel_values": pixel_values,
                "skipped": skipped, "truncated": encoded.truncated}


def _processor_size(image_processor: Any) -> int:
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    return int(crop["height"] if "height" in crop else crop["shortest_edge"])
