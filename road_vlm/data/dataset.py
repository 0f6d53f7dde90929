"""LLaVA instruction data -> validated training samples, tokenised and decoded lazily (as LLaVA's own dataset).

Input: a JSON array or JSONL file of ``{"id", "image"?, "conversations": [{"from", "value"}, ...]}`` (LLaVA's
``llava_v1_5_mix665k.json`` format), images relative to an image folder, text-only samples allowed.

Everything that can be checked without decoding an image is checked *before* training starts, with errors that
name the file, the line (JSONL) or record index (JSON array) and the sample id: malformed JSON, missing
``conversations``, wrong turn order, ``<image>`` without an image (or the reverse), what the template cannot
render, missing image files. Image samples whose image tokens would not fit in ``max_length`` are dropped and
counted (where the image ends is the same for every sample, so this needs no tokenising).

Tokenising and image *decoding* happen in ``__getitem__`` (in DataLoader workers): tokenising 665k samples up
front took 7.7 minutes and 6.5 GB per rank on 2 CPU ranks, indexing them takes 1.6 minutes and 2 GB. Text beyond
``max_length`` is truncated as LLaVA does and the item says so (``truncated``, counted by the trainer); a sample
left with no answer token after truncation, or whose image cannot be read with ``on_bad_image="skip"``, keeps its
shape but supervises nothing (``skipped``, counted), so every rank still sees the same number of samples. An
unreadable image is otherwise an error naming the sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from road_vlm.data.images import ImageLoadError, load_image, preprocess_images
from road_vlm.data.template import (
    IGNORE_INDEX,
    LabelingError,
    conversation_to_turns,
    encode_training_sample,
    image_tokens_end,
    render_training_sample,
)

logger = logging.getLogger(__name__)

ON_BAD_IMAGE = ("error", "skip")


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, line/record and sample id."""


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


@dataclass
class _Record:
    sample_id: str
    where: str  # "file:line N" or "file record N" for error messages
    image: str | None
    conversations: list[dict[str, Any]]


def _where(path: Path, index: int, jsonl: bool) -> str:
    return f"{path}:{index + 1}" if jsonl else f"{path} record {index}"


_CHUNK_CHARS = 1 << 22  # the JSON array is parsed from 4M-character windows, never held whole


def _json_array_items(path: Path) -> Iterator[tuple[int, Any]]:
    """``(index, item)`` of a top-level JSON array, parsed incrementally: a 1 GB mix665k file is never held as
    one string next to all of its parsed objects (that alone would be several GB per rank)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False
        line, base, line_start = 1, 0, 0  # line number at buf[0]; buf[0]'s offset in the file; start of its line

        def fill() -> None:
            nonlocal buf, pos, eof, line, base, line_start
            line += buf.count("\n", 0, pos)
            last_newline = buf.rfind("\n", 0, pos)
            if last_newline >= 0:
                line_start = base + last_newline + 1
            base += pos
            chunk = f.read(_CHUNK_CHARS)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0

        def skip_space() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return
                fill()

        def fail(msg: str, at: int) -> DataError:
            at_line = line + buf.count("\n", 0, at)
            newline = buf.rfind("\n", 0, at)
            column = (at - newline if newline >= 0 else base + at - line_start + 1)
            return DataError(f"{path}:{at_line}:{column}: malformed JSON: {msg}")

        fill()
        skip_space()
        if pos >= len(buf) or buf[pos] != "[":
            raise fail("expected '[' (a JSON array of samples)", pos)
        pos += 1
        index = 0
        while True:
            skip_space()
            if pos >= len(buf):
                raise fail("the array is not closed with ']'", pos)
            if buf[pos] == "]":
                pos += 1
                skip_space()
                if pos < len(buf):
                    raise fail("extra data after the array", pos)
                return
            if index:
                if buf[pos] != ",":
                    raise fail("expected ',' or ']' between samples", pos)
                pos += 1
                skip_space()
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if eof:
                        raise fail(err.msg, err.pos) from err
                else:
                    # An item ending exactly at the window's edge may be cut (a number): decode it with more text.
                    if end < len(buf) or eof:
                        break
                fill()  # the item continues in the next window
            yield index, item
            pos = end
            index += 1


def _jsonl_items(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno + 1}: malformed JSON line: {err.msg}") from err


def iter_records(path: str | Path) -> Iterator[_Record]:
    """Parse LLaVA instruction data (JSON array or JSONL) record by record, checking each record's shape."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path)")
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    jsonl = not head.startswith("[")
    seen: set[str] = set()
    for index, item in _jsonl_items(path) if jsonl else _json_array_items(path):
        where = _where(path, index, jsonl)
        if not isinstance(item, dict):
            raise DataError(f"{where}: a sample must be a JSON object, got {type(item).__name__}")
        sample_id = str(item.get("id", f"#{index}"))
        where = f"{where} (id {sample_id})"
        if "conversations" not in item:
            raise DataError(f"{where}: missing 'conversations'")
        image = item.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise DataError(f"{where}: 'image' must be a non-empty relative path string, got {image!r}")
        try:
            conversation_to_turns(item["conversations"], has_image=image is not None)
        except LabelingError as err:
            raise DataError(f"{where}: {err}") from err
        if sample_id in seen:
            logger.warning("%s: duplicate sample id %s", where, sample_id)
        seen.add(sample_id)
        yield _Record(sample_id, where, image, item["conversations"])


def read_records(path: str | Path) -> list[_Record]:
    """Every record of a data file, checked (see :func:`iter_records`)."""
    return list(iter_records(path))


def modality_length(conversations: list[dict[str, Any]], has_image: bool) -> int:
    """LLaVA's modality length: word count of all turns, negative for text-only samples (never 0)."""
    words = max(1, sum(len(turn["value"].split()) for turn in conversations))
    return words if has_image else -words


def _features():
    from datasets import Features, Value

    return Features({
        "order": Value("int64"),  # record index in the data file: shards are merged back into file order
        "id": Value("string"),
        "image": Value("string"),
        "conversations": Value("string"),  # the record's turns as JSON, tokenised on access
        "modality_length": Value("int64"),
    })


def index_shard(
    data_path: str | Path,
    *,
    tokenizer: Any,
    num_image_tokens: int,
    image_token_id: int,
    max_length: int = 2048,
    image_folder: str | Path | None = None,
    on_bad_image: str = "error",
    shard_index: int = 0,
    num_shards: int = 1,
    template: str = "vicuna_v1",
    allow_images_outside_folder: bool = False,
) -> tuple[Any, DataStats]:
    """Validate every record, then check the images of records ``shard_index::num_shards`` and keep them.

    Returns the shard as a ``datasets.Dataset`` (the records' turns as JSON text, tokenised on access) and its
    stats (``num_records`` counts the whole file). Training processes each index one shard and merge them with
    ``merge_shards``.

    Image paths must stay inside the image folder once resolved (no ``..``, absolute paths or symlinks leading
    out) unless ``allow_images_outside_folder``; the shard's first image is decoded up front, so a file that is
    not an image fails now rather than mid-training.
    """
    import datasets
    import pyarrow as pa

    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    data_path = Path(data_path)
    folder = Path(image_folder) if image_folder is not None else data_path.parent
    stats = DataStats()
    features = _features()
    columns: dict[str, list[Any]] = {name: [] for name in features}
    batches: list[Any] = []
    root = folder.resolve()
    first_image: tuple[_Record, Path] | None = None
    image_end = image_tokens_end(tokenizer, num_image_tokens=num_image_tokens, image_token_id=image_token_id,
                                 template=template)
    # Every rank validates the whole file's structure (cheap, and fails alike); only its own shard is kept.
    for order, rec in enumerate(iter_records(data_path)):
        stats.num_records += 1
        if order % num_shards != shard_index:
            continue
        try:  # what the template cannot render (e.g. a multi-turn record for ``plain``): dropped and counted
            render_training_sample(rec.conversations, has_image=rec.image is not None, template=template)
        except LabelingError as err:
            stats.dropped.setdefault(f"cannot be labelled: {err}", []).append(rec.sample_id)
            continue
        if rec.image is not None:
            image_path = folder / rec.image
            if not allow_images_outside_folder and not image_path.resolve().is_relative_to(root):
                raise DataError(f"{rec.where}: image path {rec.image!r} leads out of the image folder {folder} "
                                "(.., an absolute path or a symlink); set data.allow_images_outside_folder=true if "
                                "that is intended")
            # Existence only: decoding every image up front would cost as much as an epoch of data loading.
            if not image_path.is_file():
                if on_bad_image == "error":
                    raise DataError(
                        f"{rec.where}: image file not found: {image_path} (set data.on_bad_image=skip to skip)"
                    )
                stats.dropped.setdefault("image file missing", []).append(rec.sample_id)
                continue
            if image_end > max_length:
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
    if first_image is not None and on_bad_image == "error":
        rec, image_path = first_image
        try:
            load_image(image_path)
        except ImageLoadError as err:
            raise DataError(f"{rec.where}: {err} (checked before training; set data.on_bad_image=skip to skip "
                            "unreadable images)") from err
    # An explicit fingerprint: without one, datasets hashes the whole in-memory table (a transient copy of it,
    # 2.7 GB for half of a 665k-record file).
    source = Path(data_path).stat()
    fingerprint = hashlib.sha256(
        f"{Path(data_path).resolve()}:{source.st_size}:{source.st_mtime_ns}:{shard_index}/{num_shards}".encode()
    ).hexdigest()[:32]
    table = pa.Table.from_batches(batches)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=fingerprint), stats


_ARROW_BATCH = 4096


def _record_batch(columns: dict[str, list[Any]], features: Any) -> Any:
    """The collected samples as one Arrow record batch; empties ``columns``."""
    import pyarrow as pa

    batch = pa.RecordBatch.from_arrays([pa.array(columns[c.name], type=c.type) for c in features.arrow_schema],
                                       schema=features.arrow_schema)
    for values in columns.values():
        values.clear()
    return batch


def merge_shards(parts: list[tuple[Any, DataStats]], data_path: str | Path) -> tuple[Any, DataStats]:
    """Concatenate encoded shards back into file order and add up their stats; no sample left is an error."""
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


@dataclass(frozen=True)
class Tokenization:
    """How a sample is tokenised on access (what ``index_shard`` checked the records against)."""

    tokenizer: Any
    num_image_tokens: int
    image_token_id: int
    max_length: int = 2048
    template: str = "vicuna_v1"


class LazySupervisedDataset(torch.utils.data.Dataset):
    """Validated LLaVA records (a ``datasets.Dataset``): tokenised and their images decoded on access.

    ``LazySupervisedDataset(path, ...)`` indexes the whole file in this process; training processes build it with
    ``from_samples`` from shards indexed in parallel (see ``index_shard``).
    """

    def __init__(
        self,
        data_path: str | Path,
        *,
        tokenizer: Any,
        image_processor: Any,
        num_image_tokens: int,
        image_token_id: int,
        max_length: int = 2048,
        image_folder: str | Path | None = None,
        image_aspect_ratio: str = "pad",
        on_bad_image: str = "error",
        template: str = "vicuna_v1",
        allow_images_outside_folder: bool = False,
    ) -> None:
        shard = index_shard(
            data_path, tokenizer=tokenizer, num_image_tokens=num_image_tokens, image_token_id=image_token_id,
            max_length=max_length, image_folder=image_folder, on_bad_image=on_bad_image, template=template,
            allow_images_outside_folder=allow_images_outside_folder,
        )
        samples, stats = merge_shards([shard], data_path)
        self._setup(samples, stats, Tokenization(tokenizer, num_image_tokens, image_token_id, max_length, template),
                    data_path=data_path, image_processor=image_processor, image_folder=image_folder,
                    image_aspect_ratio=image_aspect_ratio, on_bad_image=on_bad_image)

    @classmethod
    def from_samples(
        cls,
        samples: Any,
        stats: DataStats,
        tokenization: Tokenization,
        *,
        data_path: str | Path,
        image_processor: Any,
        image_folder: str | Path | None = None,
        image_aspect_ratio: str = "pad",
        on_bad_image: str = "error",
    ) -> LazySupervisedDataset:
        """Wrap already indexed samples (``merge_shards`` output)."""
        self = cls.__new__(cls)
        self._setup(samples, stats, tokenization, data_path=data_path, image_processor=image_processor,
                    image_folder=image_folder, image_aspect_ratio=image_aspect_ratio, on_bad_image=on_bad_image)
        return self

    def _setup(self, samples: Any, stats: DataStats, tokenization: Tokenization, *, data_path: str | Path,
               image_processor: Any, image_folder: str | Path | None, image_aspect_ratio: str,
               on_bad_image: str) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self.data_path = Path(data_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.data_path.parent
        self.tokenization = tokenization
        self.image_processor = image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.on_bad_image = on_bad_image
        self.stats = stats
        # Arrow-backed storage keeps 665k records compact and shareable with DataLoader workers.
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
        t = self.tokenization
        has_image = row["image"] is not None
        try:
            encoded = encode_training_sample(
                t.tokenizer, json.loads(row["conversations"]), has_image=has_image,
                num_image_tokens=t.num_image_tokens, image_token_id=t.image_token_id, max_length=t.max_length,
                template=t.template, require_supervised=False,
            )
        except LabelingError as err:  # index_shard checked what can fail here; a changed setting could not be
            raise DataError(f"{self.data_path} (id {row['id']}): {err}") from err
        input_ids = torch.tensor(encoded.input_ids, dtype=torch.long)
        labels = torch.tensor(encoded.labels, dtype=torch.long)
        # Truncation left no answer token: the sample keeps its shape and supervises nothing (counted as skipped).
        skipped = bool((labels == IGNORE_INDEX).all())
        pixel_values = None
        if has_image:
            path = self.image_folder / row["image"]
            try:
                image = load_image(path)
            except ImageLoadError as err:
                if self.on_bad_image == "error":
                    raise DataError(f"{self.data_path} (id {row['id']}): {err}") from err
                # Keep the image tokens (and so the batch shape) but supervise nothing: the sample is skipped
                # without changing how many samples each rank sees, so distributed steps stay in lockstep.
                logger.warning("%s (id %s): skipping unreadable image: %s", self.data_path, row["id"], err)
                image = None
                skipped = True
                labels = torch.full_like(labels, IGNORE_INDEX)
            if image is None:
                size = _processor_size(self.image_processor)
                pixel_values = torch.zeros(3, size, size)
            else:
                pixel_values = preprocess_images(self.image_processor, [image], self.image_aspect_ratio)[0]
        return {"id": row["id"], "input_ids": input_ids, "labels": labels, "pixel_values": pixel_values,
                "skipped": skipped, "truncated": encoded.truncated}


def _processor_size(image_processor: Any) -> int:
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    return int(crop["height"] if "height" in crop else crop["shortest_edge"])


def summarize_drops(stats: DataStats) -> str:
    """One line for logs: how many samples were kept, truncated and dropped (by reason)."""
    reasons = Counter({reason: len(ids) for reason, ids in stats.dropped.items()})
    parts = [f"{stats.num_samples}/{stats.num_records} samples kept "
             f"({stats.num_image_samples} with image, {stats.num_text_samples} text-only)"]
    for reason, count in reasons.most_common():
        parts.append(f"{count} dropped ({reason})")
    return "; ".join(parts)
