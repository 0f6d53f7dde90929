"""The training data of a run, indexed once across ranks before the first step (tokenised on access)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from road_vlm.data.config import DataConfig
from road_vlm.data.dataset import LazySupervisedDataset
from road_vlm.data.indexing import DataStats, Tokenization, index_shard, merge_shards
from road_vlm.train.config import TrainingConfig
from road_vlm.train.distributed import DistInfo, first_error

DATA_CACHE = ".data-cache"  # under output.dir: the ranks' indexed shards, removed when the run ends


class TaskDatasets(torch.utils.data.Dataset):
    """A co-training run's data (``compose.tasks``): the tasks' datasets end to end; ``task_of[i]`` is sample i's
    task. Offers what the trainer reads of a ``LazySupervisedDataset``."""

    def __init__(self, parts: list[LazySupervisedDataset]) -> None:
        self.parts = parts
        self.task_of: list[int] = [t for t, part in enumerate(parts) for _ in range(len(part))]
        self._offsets = [sum(len(p) for p in parts[:t]) for t in range(len(parts))]
        self.has_image: list[bool] = [flag for part in parts for flag in part.has_image]
        self.modality_lengths: list[int] = [n for part in parts for n in part.modality_lengths]
        self.stats = DataStats(
            num_records=sum(p.stats.num_records for p in parts), num_samples=len(self.task_of),
            num_image_samples=sum(p.stats.num_image_samples for p in parts),
            num_text_samples=sum(p.stats.num_text_samples for p in parts),
            dropped={f"{p.data.path}: {reason}": ids for p in parts for reason, ids in p.stats.dropped.items()})

    def __len__(self) -> int:
        return len(self.task_of)

    def _locate(self, index: int) -> tuple[LazySupervisedDataset, int]:
        task = self.task_of[index]
        return self.parts[task], index - self._offsets[task]

    def sample_id(self, index: int) -> str:
        part, local = self._locate(index)
        return part.sample_id(local)

    def __getitem__(self, index: int) -> dict[str, Any]:
        part, local = self._locate(index)
        return part[local]


def build_dataset(config: TrainingConfig, processor: Any, model: Any,
                  dist: DistInfo) -> LazySupervisedDataset | TaskDatasets:
    """The run's data: ``data.path``, or each of ``compose.tasks``' files (same data settings otherwise)."""
    if not config.compose.tasks:
        return _indexed(config.data, Path(config.output.dir) / DATA_CACHE, processor, model, dist)
    return TaskDatasets([
        _indexed(replace(config.data, path=task.data), Path(config.output.dir) / DATA_CACHE / task.name, processor,
                 model, dist)
        for task in config.compose.tasks])


def _indexed(data: DataConfig, cache: Path, processor: Any, model: Any, dist: DistInfo) -> LazySupervisedDataset:
    """Validate one data file before training; with N processes each indexes 1/N of it.

    Shards go through ``cache`` (``<output.dir>/.data-cache/``: Arrow files on the shared output filesystem,
    memory-mapped by every rank), so no rank repeats another's indexing and nothing large travels through
    collectives.
    """
    import datasets

    from road_vlm.model import num_image_tokens

    processor.tokenizer.padding_side = "right"
    tokenization = Tokenization(processor.tokenizer, num_image_tokens(processor), model.config.image_token_id)
    if dist.world_size == 1:
        parts = [first_error(dist, index_shard, data, tokenization)]
    else:
        def _index_and_write() -> None:  # the in-memory shard is dropped once written: ranks read all shards mmapped
            shard, shard_stats = index_shard(data, tokenization, shard_index=dist.rank, num_shards=dist.world_size)
            shard.save_to_disk(str(cache / f"shard-{dist.rank}"))
            (cache / f"shard-{dist.rank}.json").write_text(json.dumps(asdict(shard_stats)))

        first_error(dist, _index_and_write)

        def _read() -> list[tuple[Any, DataStats]]:
            return [(datasets.load_from_disk(str(cache / f"shard-{r}")),
                     DataStats(**json.loads((cache / f"shard-{r}.json").read_text())))
                    for r in range(dist.world_size)]

        parts = first_error(dist, _read)
    samples, stats = first_error(dist, merge_shards, parts, data.path)
    return LazySupervisedDataset.from_samples(samples, stats, data, tokenization, processor.image_processor)
