"""LLaVA instruction data read record by record, each record's shape checked, errors naming file, line and id.

Input: a JSON array or JSONL file of ``{"id", "image"?, "conversations": [{"from", "value"}, ...]}`` (LLaVA's
``llava_v1_5_mix665k.json`` format), text-only samples allowed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from road_vlm.data.json_stream import MalformedJSONError, json_array_items, jsonl_items
from road_vlm.data.template import LabelingError, conversation_to_turns

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, line/record and sample id."""


@dataclass
class Record:
    sample_id: str
    where: str  # "file:line N" or "file record N" for error messages
    image: str | None
    conversations: list[dict[str, Any]]


def _where(path: Path, index: int, jsonl: bool) -> str:
    return f"{path}:{index + 1}" if jsonl else f"{path} record {index}"


def iter_records(path: str | Path) -> Iterator[Record]:
    """Parse LLaVA instruction data (JSON array or JSONL) record by record, checking each record's shape."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path)")
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    jsonl = not head.startswith("[")
    seen: set[str] = set()
    try:
        for index, item in jsonl_items(path) if jsonl else json_array_items(path):
            yield _checked(item, _where(path, index, jsonl), index, seen)
    except MalformedJSONError as err:
        raise DataError(str(err)) from err


def _checked(item: Any, where: str, index: int, seen: set[str]) -> Record:
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
    return Record(sample_id, where, image, item["conversations"])


def read_records(path: str | Path) -> list[Record]:
    """Every record of a data file, checked (see :func:`iter_records`)."""
    return list(iter_records(path))


def modality_length(conversations: list[dict[str, Any]], has_image: bool) -> int:
    """LLaVA's modality length: word count of all turns, negative for text-only samples (never 0)."""
    words = max(1, sum(len(turn["value"].split()) for turn in conversations))
    return words if has_image else -words
