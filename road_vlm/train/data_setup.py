"""The training data of a run, indexed once across ranks before the first step (tokenised on access)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from road_vlm.data.dataset import LazySupervisedDataset
from road_vlm.data.indexing import DataStats, Tokenization, index_shard, merge_shards
from road_vlm.train.config import TrainingConfig
from road_vlm.train.distributed import DistInfo, first_error

DATA_CACHE = ".data-cache"  # under output.dir: the ranks' indexed shards, removed when the run ends


def build_dataset(config: TrainingConfig, processor: Any, model: Any, dist: DistInfo) -> LazySupervisedDataset:
    """Validate the training data before training; with N processes each indexes 1/N of it.

    Shards go through ``<output.dir>/.data-cache/`` (Arrow files on the shared output filesystem, memory-mapped
    by every rank), so no rank repeats another's indexing and nothing large travels through collectives.
    """
    import datasets

    from road_vlm.model import num_image_tokens

    data = config.data
    processor.tokenizer.padding_side = "right"
    tokenization = Tokenization(processor.tokenizer, num_image_tokens(processor), model.config.image_token_id)
    if dist.world_size == 1:
        parts = [first_error(dist, index_shard, data, tokenization)]
    else:
        cache = Path(config.output.dir) / DATA_CACHE

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
