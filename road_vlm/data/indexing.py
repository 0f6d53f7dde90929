"""Validated LLaVA records -> an Arrow-backed index of the samples to train on (tokenised later, on access).

Everything that can be checked without decoding an image is checked *before* training starts: the records' shape
(``road_vlm.data.records``), what the template cannot render, missing image files, image paths that leave the
image folder. Image samples whose image tokens would not fit in ``max_length`` are dropped and counted (where the
image ends is the same for every sample, so this needs no tokenising). With N training processes each indexes
1/N of the records (``index_shard``) and ``merge_shards`` puts them back into file order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from road_vlm.data.config import DataConfig
from road_vlm.data.images import ImageLoadError, load_image
from road_vlm.data.records import DataError, Record, iter_records, modality_length
from road_vlm.data.template import LabelingError, image_tokens_end, render_training_sample

logger = logging.getLogger(__name__)

_ARROW_BATCH = 4096  # samples per Arrow record batch while indexing


@dataclass(frozen=True)
class Tokenization:
    """The model's side of tokenising a sample: its tokenizer and how ``<image>`` expands."""

    tokenizer: Any
    num_image_tokens: int
    image_token_id: int


@dataclass
class DataStats:
    """What happened to every input record (reported before and after training)."""

    num_records: int = 0
    num_samples: int = 0  # kept for training
    num_image_samples: int = 0
    num_text_samples: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> sample ids

    @property
    def num_dropped(self) -> int:
        return sum(len(v) for v in self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_records": self.num_records,
            "num_samples": self.num_samples,
            "num_image_samples": self.num_image_samples,
            "num_text_samples": self.num_text_samples,
            "num_dropped": self.num_dropped,
            "dropped": {reason: {"count": len(ids), "ids": ids[:50]} for reason, ids in self.dropped.items()},
        }


def _features():
    from datasets import Features, Value

    return Features({
        "order": Value("int64"),  # record index in the data file: shards are merged back into file order
        "id": Value("string"),
        "image": Value("string"),
        "conversations": Value("string"),  # the record's turns as JSON, tokenised on access
        "modality_length": Value("int64"),
    })


def index_shard(data: DataConfig, tokenization: Tokenization, *, shard_index: int = 0,
                num_shards: int = 1) -> tuple[Any, DataStats]:
    """Validate every record of ``data.path``, then check the images of records ``shard_index::num_shards`` and
    keep them.

    Returns the shard as a ``datasets.Dataset`` (the records' turns as JSON text, tokenised on access) and its
    stats (``num_records`` counts the whole file).

    Image paths must stay inside the image folder once resolved (no ``..``, absolute paths or symlinks leading
    out) unless ``data.allow_images_outside_folder``; the shard's first image is decoded up front, so a file that
    is not an image fails now rather than mid-training.
    """
    import datasets
    import pyarrow as pa

    data_path = Path(data.path)
    folder = data.image_dir
    stats = DataStats()
    features = _features()
    columns: dict[str, list[Any]] = {name: [] for name in features}
    batches: list[Any] = []
    root = folder.resolve()
    first_image: tuple[Record, Path] | None = None
    image_end = image_tokens_end(tokenization.tokenizer, num_image_tokens=tokenization.num_image_tokens,
                                 image_token_id=tokenization.image_token_id, template=data.template)
    # Every rank validates the whole file's structure (cheap, and fails alike); only its own shard is kept.
    for order, rec in enumerate(iter_records(data_path)):
        stats.num_records += 1
        if order % num_shards != shard_index:
            continue
        try:  # what the template cannot render (e.g. a multi-turn record for ``plain``): dropped and counted
            render_training_sample(rec.conversations, has_image=rec.image is not None, template=data.template)
        except LabelingError as err:
            stats.dropped.setdefault(f"cannot be labelled: {err}", []).append(rec.sample_id)
            continue
        if rec.image is not None:
            image_path = folder / rec.image
            if not data.allow_images_outside_folder and not image_path.resolve().is_relative_to(root):
                raise DataError(f"{rec.where}: image path {rec.image!r} leads out of the image folder {folder} "
                                "(.., an absolute path or a symlink); set data.allow_images_outside_folder=true if "
                                "that is intended")
            # Existence only: decoding every image up front would cost as much as an epoch of data loading.
            if not image_path.is_file():
                if data.on_bad_image == "error":
                    raise DataError(
                        f"{rec.where}: image file not found: {image_path} (set data.on_bad_image=skip to skip)"
                    )
                stats.dropped.setdefault("image file missing", []).append(rec.sample_id)
                continue
            if image_end > data.max_length:
                stats.dropped.setdefault("image tokens would be cut at max_length", []).append(rec.sample_id)
                continue
            if first_image is None:
                first_image = (rec, image_path)
        for name, value in (("order", order), ("id", rec.sample_id), ("image", rec.image),
                            ("conversations", json.dumps(rec.conversations, ensure_ascii=False)),
                            ("modality_length", modality_length(rec.conversations, rec.image is not None))):
            columns[name].append(value)
        if len(columns["order"]) >= _ARROW_BATCH:
            batches.append(_record_batch(columns, features))
    if columns["order"] or not batches:
        batches.append(_record_batch(columns, features))
    if first_image is not None and data.on_bad_image == "error":
        rec, image_path = first_image
        try:
            load_image(image_path)
        except ImageLoadError as err:
            raise DataError(f"{rec.where}: {err} (checked before training; set data.on_bad_image=skip to skip "
                            "unreadable images)") from err
    # An explicit fingerprint: without one, datasets hashes the whole in-memory table (a transient copy of it, as
    # large as the shard).
    source = data_path.stat()
    fingerprint = hashlib.sha256(
        f"{data_path.resolve()}:{source.st_size}:{source.st_mtime_ns}:{shard_index}/{num_shards}".encode()
    ).hexdigest()[:32]
    table = pa.Table.from_batches(batches)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=fingerprint), stats


def _record_batch(columns: dict[str, list[Any]], features: Any) -> Any:
    """The collected samples as one Arrow record batch; empties ``columns``."""
    import pyarrow as pa

    batch = pa.RecordBatch.from_arrays([pa.array(columns[c.name], type=c.type) for c in features.arrow_schema],
                                       schema=features.arrow_schema)
    for values in columns.values():
        values.clear()
    return batch


def merge_shards(parts: list[tuple[Any, DataStats]], data_path: str | Path) -> tuple[Any, DataStats]:
    """Concatenate indexed shards back into file order and add up their stats; no sample left is an error."""
    import datasets

    stats = DataStats(num_records=parts[0][1].num_records)
    for _, part in parts:
        for reason, ids in part.dropped.items():
            stats.dropped.setdefault(reason, []).extend(ids)
    samples = datasets.concatenate_datasets([p for p, _ in parts]).sort("order")
    stats.num_samples = len(samples)
    stats.num_image_samples = sum(1 for image in samples["image"] if image is not None)
    stats.num_text_samples = stats.num_samples - stats.num_image_samples
    for reason, ids in stats.dropped.items():
        logger.warning("%s: dropped %d sample(s) [%s], e.g. %s", data_path, len(ids), reason, ids[:5])
    if not len(samples):
        raise DataError(
            f"{data_path}: no usable samples left after filtering "
            f"({stats.num_records} records, dropped: { {k: len(v) for k, v in stats.dropped.items()} })"
        )
    return samples, stats


def summarize_drops(stats: DataStats) -> str:
    """One line for logs: how many samples were kept, truncated and dropped (by reason)."""
    reasons = Counter({reason: len(ids) for reason, ids in stats.dropped.items()})
    parts = [f"{stats.num_samples}/{stats.num_records} samples kept "
             f"({stats.num_image_samples} with image, {stats.num_text_samples} text-only)"]
    for reason, count in reasons.most_common():
        parts.append(f"{count} dropped ({reason})")
    return "; ".join(parts)
